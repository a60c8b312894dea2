"""ClassificationModule through a Lightning fit: labels from the data, metrics, calibration, multi-label."""

from __future__ import annotations

import lightning as L
import torch

from zoo.datamodules.classification import ClassificationDataModule
from zoo.modules.classification import ClassificationModule


def fit(data: ClassificationDataModule, **kwargs) -> tuple[L.Trainer, ClassificationModule]:
    torch.manual_seed(0)
    module = ClassificationModule(model="tiny-llama", export=False, lr=1e-3, **kwargs)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, val_check_interval=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return trainer, module


def test_single_label_fit_logs_accuracy_macro_f1_and_calibrates_on_unlabeled_texts():
    data = ClassificationDataModule(dataset="sentiment_hard", tokenizer="tiny-llama", shots_per_class=2,
                                    num_unlabeled=4, num_train=60, num_val=4, num_test=4, max_length=400,
                                    batch_size=2, eval_batch_size=4)
    trainer, module = fit(data, calibration="unlabeled")
    metrics = trainer.callback_metrics
    assert {"val/accuracy", "val/macro_f1", "val/label_ce", "val/loss"} <= set(metrics)
    assert 0.0 <= float(metrics["val/accuracy"]) <= 1.0
    assert module.verbalizer.labels == ["positive", "negative"]  # adopted from the data
    prior = module.verbalizer.prior
    assert torch.allclose(prior.sum(), torch.tensor(1.0, dtype=prior.dtype))
    assert not torch.allclose(prior, torch.full_like(prior, 0.5))  # measured, not the uniform start
    expected = module.score_prompts([r["prompt"] for r in data.records["unlabeled"]], calibrated=False)
    assert torch.allclose(prior, expected.softmax(-1).mean(0).to(prior.dtype), atol=1e-6)
    assert module.export_init_args()["labels"] == ["positive", "negative"]


def test_multi_label_fit_logs_micro_macro_and_per_class_f1_with_pos_weight():
    data = ClassificationDataModule(dataset="sectors", tokenizer="tiny-llama", num_train=8, num_val=4,
                                    num_test=4, max_length=400, batch_size=2, eval_batch_size=4)
    trainer, module = fit(data, labels=None)
    metrics = trainer.callback_metrics
    assert module.multi_label and module.pos_weight.shape == (8,)
    assert torch.allclose(module.pos_weight.double(), torch.tensor(data.pos_weight(), dtype=torch.float64))
    assert {"val/micro_f1", "val/macro_f1", "val/f1/technology"} <= set(metrics)

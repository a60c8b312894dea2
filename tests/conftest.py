"""Test environment: offline, single-threaded, Triton interpreter, and tiny-backbone fixtures.

Env vars must be set before torch / transformers / triton kernels are imported.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_HF_HOME = tempfile.mkdtemp(prefix="zoo-test-hf-")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_HF_HOME, "datasets"))

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tiny_module():
    """Factory: ``tiny_module(cls=CausalLMModule, **kwargs)`` on the tiny random Llama."""
    from zoo.modules import CausalLMModule

    def make(cls=CausalLMModule, **kwargs):
        kwargs.setdefault("model", "tiny-llama")
        kwargs.setdefault("lr", 1e-3)
        kwargs.setdefault("export", False)
        return cls(**kwargs)

    return make


@pytest.fixture
def tiny_data():
    """Factory: ``tiny_data(**kwargs)``: a few chain_sum problems with the tiny byte tokenizer (11 training
    rows: batches of 4, 4, 3, so epochs end mid-schedule in the tests that count them)."""
    from zoo.datamodules import SFTDataModule

    def make(**kwargs):
        defaults = dict(dataset="chain_sum", tokenizer="tiny-llama", num_train=11, num_val=4, num_test=4,
                        max_length=96, batch_size=4, eval_batch_size=4)
        return SFTDataModule(**{**defaults, **kwargs})

    return make


@pytest.fixture
def fit_tiny(tmp_path):
    """Factory: ``fit_tiny(module, data, callbacks=(), max_steps=2, **trainer_kwargs) -> Trainer``."""

    def run(module, data, callbacks=(), max_steps=2, **trainer_kwargs):
        L.seed_everything(0, verbose=False)
        options = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                       num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
        options.update(trainer_kwargs)
        trainer = L.Trainer(callbacks=list(callbacks), **options)
        trainer.fit(module, datamodule=data)
        return trainer

    return run


def tiny_batch(batch_size: int = 2, length: int = 12, vocab: int = 258, prompt: int = 4, seed: int = 0):
    """A hand-made batch: random ids, the first ``prompt`` positions unsupervised, no padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 256, (batch_size, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    segments = torch.full_like(input_ids, 2)
    segments[:, :prompt] = 1
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "segments": segments, "index": torch.arange(batch_size)}


@pytest.fixture
def make_batch():
    return tiny_batch


@pytest.fixture(scope="module")
def sharp_tiny():
    """The tiny Llama with large random matrices (so greedy continuations depend on the prompt), eval mode."""
    from zoo import backbone

    model, tokenizer = backbone.tiny_llama()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval(), tokenizer

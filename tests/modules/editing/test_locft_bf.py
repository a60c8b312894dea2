"""LocFT-BF (spec 14): one named matrix changes and nothing else; exact names; per-request mean loss; the
skip, stop and depth-first rules; editing protocols restore the matrix."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from zoo.datamodules.editing import EditingDataModule
from zoo.datamodules.sft import collate, encode_example
from zoo.errors import ConfigError
from zoo.modules.editing import LocFTBFEditor, localized_parameter_name, run_protocol

EDITS = [{"prompt": f"Where is thing {i}?", "target_new": "Place" + " x" * i,
          "rephrase": [f"Thing {i} is where?"],
          "locality": [{"prompt": "What is 2+2?", "answer": "4"}]} for i in range(4)]


def editor(**kwargs) -> LocFTBFEditor:
    kwargs.setdefault("model", "tiny-llama")
    kwargs.setdefault("export", False)
    kwargs.setdefault("evaluate_edits", False)
    return LocFTBFEditor(**kwargs)


def test_fit_changes_only_the_named_matrix(tmp_path, fit_tiny):
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EDITS))
    data = EditingDataModule(dataset=str(path), tokenizer="tiny-llama", num_train=4, num_val=4, num_test=4,
                             max_length=128, batch_size=2)
    module = editor(layer=0, lr=1e-2)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    fit_tiny(module, data, max_steps=3, gradient_clip_val=None)
    after = module.state_dict()
    name = "model.model.layers.0.mlp.down_proj.weight"
    assert module.edit_param_name == "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(after[name], before[name])
    changed = [k for k in before if k != name and not torch.equal(after[k], before[k])]
    assert changed == []


def test_names_are_exact_and_the_default_layer_is_at_70_percent_depth():
    module = editor()
    model = module.model
    assert localized_parameter_name(model, None, None, "mlp.down_proj.weight") == \
        "model.layers.1.mlp.down_proj.weight"  # int(0.7 * 2)
    assert localized_parameter_name(model, None, -2, "self_attn.q_proj.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ConfigError):
        localized_parameter_name(model, "model.layers.1.mlp.down_proj", None, "")  # a prefix is not a name
    with pytest.raises(ConfigError):
        localized_parameter_name(model, None, 5, "mlp.down_proj.weight")
    assert [n for n, p in module.named_parameters() if p.requires_grad] == \
        ["model.model.layers.1.mlp.down_proj.weight"]


def _batch(module, records):
    rows = [encode_example(module.tokenizer, r["prompt"], r["target_new"]) for r in records]
    for i, row in enumerate(rows):
        row["index"] = i
    return collate(rows, module.tokenizer.pad_token_id)


def test_loss_is_the_mean_over_requests_of_each_requests_token_mean():
    module = editor()
    records = [{"prompt": "a?", "target_new": ""}, {"prompt": "b?", "target_new": "xyzw"}]  # 1 and 5 targets
    batch = _batch(module, records)
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_request = []
        for row in range(2):
            labels = batch["labels"][row, 1:]
            keep = labels != -100
            nll = F.cross_entropy(logits[row, :-1][keep], labels[keep], reduction="none")
            per_request.append(nll.mean())
        assert [int(k) for k in (batch["labels"] != -100).sum(1)] == [1, 5]
        expected = torch.stack(per_request).mean()
        assert float(module.edit_loss(batch)) == pytest.approx(float(expected), rel=1e-5)


def test_tau_step_above_the_loss_skips_every_update_and_huge_tau_stop_runs_one_epoch():
    module = editor(tau_step=1e9)
    before = module.model.model.layers[1].mlp.down_proj.weight.detach().clone()
    module.edit(EDITS, epochs=3, batch_size=2)
    assert torch.equal(module.model.model.layers[1].mlp.down_proj.weight, before)
    assert editor(tau_stop=1e9).edit(EDITS, epochs=5, batch_size=2) == 1
    assert editor(tau_stop=0.0).edit(EDITS, epochs=3, batch_size=2) == 3


def test_depth_first_takes_up_to_depth_steps_per_request_and_never_revisits():
    module = editor(mode="depth_first", tau_step=0.0, depth_steps=3, tau_stop=1e9)
    steps = []
    original = torch.optim.Adam.step

    def counting(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    torch.optim.Adam.step = counting
    try:
        epochs = module.edit(EDITS, epochs=5, batch_size=4)
    finally:
        torch.optim.Adam.step = original
    assert epochs == 1 and len(steps) == 3 * len(EDITS)


@pytest.mark.parametrize("protocol", ["single", "batch", "sequential"])
def test_protocols_report_the_metrics_and_restore_the_matrix(protocol):
    module = editor(lr=1e-2)
    weight = module.model.model.layers[1].mlp.down_proj.weight
    before = weight.detach().clone()
    metrics = run_protocol(module, EDITS[:2], protocol, group_size=1, epochs=2, batch_size=2)
    assert set(metrics) == {"efficacy", "generalization", "locality", "fluency"}
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k != "fluency")
    assert torch.equal(weight, before)


def test_several_processes_are_refused_with_one_line():
    """Per-rank step / stop decisions would hang DDP's all-reduce: more than one process is refused."""
    from types import SimpleNamespace

    module = editor()
    module._trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ConfigError, match="one device"):
        module.on_train_start()

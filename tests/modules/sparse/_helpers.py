"""Shared helpers for the parameter-selection tests (not a test module)."""

from __future__ import annotations

import lightning as L
import torch


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def ordered_data(tiny_data, **kwargs):
    """tiny_data whose train loader does not shuffle (resume tests need the same order after a restart)."""
    data = tiny_data(**{"max_length": 256, **kwargs})
    data.train_dataloader = lambda: data._loader("train", shuffle=False)
    return data


def trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                   default_root_dir=tmp_path, enable_checkpointing=False)
    options.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **options)

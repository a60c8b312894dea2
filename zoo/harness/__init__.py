"""The evaluation harness: the same tasks, metrics and report for every method.

``zoo.harness.generation``  batched greedy generation (left padding, KV cache) and held-out response NLL.
``zoo.harness.runner``      builds a run (trainer, module, data) from YAML configs: the zoo's LightningCLI.
``zoo.harness.bench``       ``python -m zoo bench``: train configs on one budget, evaluate, write
results.{jsonl,md,png}.
``zoo.harness.speed``       ``python -m zoo.harness.speed``: Lightning training step vs a bare PyTorch loop.
"""

from zoo.harness.generation import generate, generate_ids, response_nll

__all__ = ["generate", "generate_ids", "response_nll"]

"""Which chain_sum response tokens ssToken keeps (configs/sstoken.yaml: keep 0.6, gamma 0.5, static base
history, last-layer prompt attention), by kind: digits of a result (after '=' on a line), other digits
(operands, the '####' answer line's are counted as results), and non-digit tokens (format).

    python docs/results/chain_sum_lr_grid/sstoken_selection.py [RUN_DIR ...]

With no RUN_DIR, the selection at step 0 (current = history = SmolLM2); each RUN_DIR (a zoo run folder with an
export, e.g. a bench's runs/sstoken-s0-...) is scored as the current model against the base history.
"""

from __future__ import annotations

import sys

import torch

from zoo.datamodules import SFTDataModule
from zoo.harness.load import load_run
from zoo.modules import CausalLMModule
from zoo.modules.base import target_mask
from zoo.modules.token_level.sstoken import SSTokenSelectCallback


def kept_by_kind(current, base, batch, tokenizer) -> dict[str, tuple[int, int]]:
    callback = SSTokenSelectCallback(keep_ratio=0.6, gamma=0.5, history="base", probe_layer=-1)
    callback.history_model = base.model
    callback.attach(current)
    current.eval()
    with torch.no_grad():
        kept = callback.select(current, batch, current(batch)).bool()
    response = target_mask(batch["labels"]).bool()
    counts = {"result digits": [0, 0], "other digits": [0, 0], "non-digit": [0, 0]}
    ids = batch["input_ids"]
    pieces = tokenizer.batch_decode(ids.reshape(-1, 1))  # one text per token, decoded once
    width = ids.shape[1]
    for b, (row_kept, row_response) in enumerate(zip(kept.tolist(), response.tolist())):
        result = False  # inside a line's result: after its '=' or '####'
        for t, piece in enumerate(pieces[b * width:(b + 1) * width]):
            result = ("=" in piece or "#" in piece or result) and "\n" not in piece
            if row_response[t]:
                digit = any(c.isdigit() for c in piece)
                kind = "result digits" if digit and result else "other digits" if digit else "non-digit"
                counts[kind][0] += int(row_kept[t])
                counts[kind][1] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}


def main(run_dirs: list[str]) -> None:
    torch.manual_seed(0)
    base = CausalLMModule(model="smollm2-135m", export=False)
    data = SFTDataModule(dataset="chain_sum", num_train=2000, num_val=32, num_test=64, max_length=256,
                         batch_size=16)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    for name, current in [("step 0", base)] + [(d, load_run(d)) for d in run_dirs]:
        counts = kept_by_kind(current, base, batch, data.tokenizer)
        print(name, ", ".join(f"{k} {n}/{m} = {n / max(1, m):.2f}" for k, (n, m) in counts.items()))


if __name__ == "__main__":
    main(sys.argv[1:])

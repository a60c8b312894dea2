"""Issue 15 bench 1: LocFT-BF vs full fine-tuning vs LoRA on the built-in pycountry edit set (SmolLM2).

Every method runs the SAME editing loop (LocFTBFEditor.edit: breadth-first mini-batch epochs, plain Adam, per-
request mean loss, tau_step / tau_stop 1e-2, up to 25 epochs); only the trainable tensors and the lr differ:
  locft_bf  model.layers.21.mlp.down_proj.weight (70% depth), lr 5e-4 (paper)
  full_ft   every backbone tensor, lr 1e-5
  lora      LoRA r=8 alpha=16 on all linear layers, lr 5e-4
Protocols: single (each edit alone on the unedited model, weights restored after each), batch (all N
edits in one breadth-first run, mini-batches of 16) and sequential (groups of ``--group_size`` edits, each
group edited to convergence before the next, every edit evaluated at the end). Per-edit records: efficacy
(EM of the edit prompt), generalisation (mean EM over the 2 rephrasings), locality (share of the 2
unrelated prompts answered as before), locality_answer (share of them whose reply still mentions the true
answer: robust to a change of phrasing), fluency (ROME n-gram entropy of a 48-token free generation from
the edit prompt).

    python docs/results/editing/bench_editing.py --out /work/benchruns/issue15/editing --edits 32
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch

from zoo.datamodules.editing import (
    EditingDataModule,
    answer,
    exact_match,
    locality_prompts,
    mentions,
    ngram_entropy,
    normalize_answer,
)
from zoo.modules.adapters import LoRA
from zoo.modules.editing import LocFTBFEditor

METHODS = {
    "locft_bf": {"lr": 5e-4},
    "full_ft": {"lr": 1e-5},
    "lora": {"lr": 5e-4},
}


def build(method: str, model: str) -> LocFTBFEditor:
    kwargs = {"model": model, "lr": METHODS[method]["lr"], "evaluate_edits": False}
    if method == "lora":
        kwargs["adapter"] = LoRA(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    editor = LocFTBFEditor(**kwargs)
    if method == "full_ft":
        for p in editor.model.parameters():
            p.requires_grad_(True)
    return editor


def per_edit(editor, records: list[dict], before: list[str]) -> list[dict]:
    direct = answer(editor, [r["prompt"] for r in records])
    reph = [(i, q) for i, r in enumerate(records) for q in r["rephrase"]]
    reph_out = answer(editor, [q for _, q in reph])
    after = answer(editor, locality_prompts(records))
    free = editor.generate_text([r["prompt"] for r in records], max_new_tokens=48)
    rows, offset = [], 0
    for i, r in enumerate(records):
        gen = [exact_match(o, r["target_new"]) for (j, _), o in zip(reph, reph_out) if j == i]
        n_loc = len(r["locality"])
        loc = [float(normalize_answer(a) == normalize_answer(b))
               for a, b in zip(after[offset:offset + n_loc], before[offset:offset + n_loc])]
        kept = [float(mentions(a, item["answer"]))
                for a, item in zip(after[offset:offset + n_loc], r["locality"])]
        offset += n_loc
        rows.append({"efficacy": exact_match(direct[i], r["target_new"]),
                     "generalization": sum(gen) / len(gen) if gen else None,
                     "locality": sum(loc) / len(loc) if loc else None,
                     "locality_answer": sum(kept) / len(kept) if kept else None,
                     "fluency": ngram_entropy(free[i]), "answer": direct[i], "target_new": r["target_new"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--edits", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="locft_bf,full_ft,lora")
    ap.add_argument("--protocols", default="batch,single")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--single_edits", type=int, default=8, help="single protocol: the first N edits only")
    ap.add_argument("--single_epochs", type=int, default=10, help="single protocol: epochs at most per edit")
    ap.add_argument("--group_size", type=int, default=4, help="sequential protocol: edits per group")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "items").mkdir(parents=True, exist_ok=True)
    dm = EditingDataModule(tokenizer=args.model, dataset="pycountry", num_train=args.edits, num_val=1,
                           num_test=1, facts_per_relation=150, known_only=True, max_length=128)
    records = dm.edit_records
    (out / "edits.json").write_text(json.dumps(records, indent=1))
    done = set()
    results = out / "results.jsonl"
    if results.exists():
        done = {(r["method"], r["protocol"]) for r in map(json.loads, results.read_text().splitlines())}
    for protocol in args.protocols.split(","):
        for method in args.methods.split(","):
            if (method, protocol) in done:
                continue
            torch.manual_seed(0)
            editor = build(method, args.model)
            editor.eval()
            trainable = {n: p for n, p in editor.named_parameters() if p.requires_grad}
            original = {n: p.detach().clone() for n, p in trainable.items()}
            before = answer(editor, locality_prompts(records))
            t0 = time.time()
            epochs = []
            if protocol == "batch":
                epochs.append(editor.edit(records, args.epochs, batch_size=16))
                rows = per_edit(editor, records, before)
            elif protocol == "sequential":  # groups edited one after another, all evaluated at the end
                for start in range(0, len(records), args.group_size):
                    group = records[start: start + args.group_size]
                    epochs.append(editor.edit(group, args.epochs, batch_size=len(group)))
                rows = per_edit(editor, records, before)
            else:
                rows, off = [], 0
                for r in records[:args.single_edits]:
                    n_loc = len(r["locality"])
                    epochs.append(editor.edit([r], args.single_epochs, batch_size=1))
                    rows += per_edit(editor, [r], before[off:off + n_loc])
                    off += n_loc
                    with torch.no_grad():
                        for n, p in trainable.items():
                            p.copy_(original[n])
            wall = time.time() - t0
            for i, row in enumerate(rows):
                row.update(id=i, subject=records[i]["subject"], relation=records[i]["relation"])
            with gzip.open(out / "items" / f"{method}-{protocol}.jsonl.gz", "wt") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            metrics = {k: sum(r[k] for r in rows) / len(rows)
                       for k in ("efficacy", "generalization", "locality", "locality_answer", "fluency")}
            rec = {"method": method, "protocol": protocol, "edits": len(rows), "lr": METHODS[method]["lr"],
                   "trainable_params": sum(p.numel() for p in trainable.values()), "metrics": metrics,
                   "epochs_mean": sum(epochs) / len(epochs),
                   "max_epochs": args.single_epochs if protocol == "single" else args.epochs, "wall_s": wall,
                   **({"group_size": args.group_size} if protocol == "sequential" else {}),
                   "backbone": args.model}
            with results.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
            del editor


if __name__ == "__main__":
    main()

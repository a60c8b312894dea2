"""``zoo analyze tuco``: Tuning Contribution (spec 10) of a tuned model relative to its base, per prompt.

    zoo analyze tuco --tuned runs/lora/20261201-120000                  # base: the LoRA switched off
    zoo analyze tuco --base tiny-llama --tuned runs/sft/... --prompts my_prompts.txt --raw-prompts web.txt

For each prompt (chat-rendered like training, or raw text) the fine-tuned forward is split per layer into the
pre-training component (the base block run on the tuned model's states) and the fine-tuning component
(:mod:`zoo.modules.analysis.tuco`); TuCo = |sum FTC|_1 / (|sum PTC|_1 + |sum FTC|_1) at the last prompt
token. Prompt files: one prompt a line (``.txt``) or JSON lines with ``prompt`` (and optional ``group``).
Without files two built-in groups are compared: instruction prompts (chat) vs web-like text (raw); the
paper finds TuCo lower on pre-training-like text. The table lists TuCo per prompt and per group (mean,
std, and the ROC-AUC of the first group against each other); the plot shows per-layer mean L1 norms of
PTC and FTC and TuCo per prompt by group.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from zoo.errors import ConfigError
from zoo.harness.analyze.common import Report, add_model_arguments, format_table, load_pair, new_figure
from zoo.harness.generation import generate_for_module
from zoo.modules.analysis.tuco import BlockPair, FTCScaler, encode_prompts, module_tuco, tuco

HELP = "Tuning Contribution: per-layer pre-training/fine-tuning components and TuCo per prompt (spec 10)."

INSTRUCTION_PROMPTS = ["What is 7 plus 5?", "Write one sentence about the sea.",
                       "Give me a synonym of happy.", "How do I boil an egg?", "List three colours.",
                       "Translate 'cat' into French."]
WEB_TEXT = ["The town was founded in 1820 by settlers from the",
            "Click here to subscribe to our newsletter and", "In 2015, the company reported revenues of",
            "The river flows north through the valley until", "Chapter 3. The morning after the storm,",
            "Posted by admin on March 4 | 12 comments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompts", action="append", default=[], metavar="FILE",
                        help="chat-rendered prompts (.txt: one a line; .jsonl: {prompt, group}); repeatable")
    parser.add_argument("--raw-prompts", action="append", default=[], metavar="FILE",
                        help="prompts fed as raw text (no chat template); repeatable")
    parser.add_argument("--system-prompt", default=None, help="system prompt for the chat rendering")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--alphas", default=None,
                        help="FTC steering: comma list of alpha (e.g. 0,0.5,1,1.5); the first "
                             "--steer-prompts chat prompts are completed greedily with the fine-tuning "
                             "component scaled by each")
    parser.add_argument("--steer-prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=24)


def read_prompts(path: str, chat: bool) -> list[tuple[str, str, bool]]:
    """``(group, prompt, chat)`` triples from a ``.txt`` (group = file stem) or ``.jsonl`` file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--prompts {path}: no such file; pass a .txt (one prompt a line) or .jsonl file")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                item = json.loads(line)
                rows.append((str(item.get("group", file.stem)), str(item["prompt"]), chat))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConfigError(f"{path}:{number}: expected a JSON object with 'prompt' ({err})") from err
        else:
            rows.append((file.stem, line, chat))
    if not rows:
        raise ConfigError(f"{path}: holds no prompts")
    return rows


def auc(positive: list[float], negative: list[float]) -> float:
    """ROC-AUC of ``positive`` scoring above ``negative`` (Mann-Whitney; ties count one half)."""
    if not positive or not negative:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def run(args: argparse.Namespace) -> Report:
    items = [row for path in args.prompts for row in read_prompts(path, True)]
    items += [row for path in args.raw_prompts for row in read_prompts(path, False)]
    if not items:
        items = [("instruction", p, True) for p in INSTRUCTION_PROMPTS]
        items += [("web-text", p, False) for p in WEB_TEXT]
    pair = load_pair(args)
    base = pair.separate_base
    module = pair.module
    ratios: list[float] = []
    ptc_layers, ftc_layers = [], []
    for chat in (True, False):
        index = [i for i, item in enumerate(items) if item[2] == chat]
        for start in range(0, len(index), max(1, args.batch_size)):
            chunk = index[start:start + args.batch_size]
            batch = encode_prompts(module.tokenizer, [items[i][1] for i in chunk], chat=chat,
                                   system_prompt=args.system_prompt)
            result, last = module_tuco(module, batch, base)
            ratio, ptc_norm, ftc_norm = tuco(result, last)
            for j, i in enumerate(chunk):
                ratios.append((i, float(ratio[j])))
                ptc_layers.append((i, ptc_norm[:, j].tolist()))
                ftc_layers.append((i, ftc_norm[:, j].tolist()))
    by_index = dict(ratios)
    ptc_by, ftc_by = dict(ptc_layers), dict(ftc_layers)
    records = [{"group": g, "prompt": p, "chat": c, "tuco": by_index[i], "ptc_l1": ptc_by[i],
                "ftc_l1": ftc_by[i]} for i, (g, p, c) in enumerate(items)]
    groups: dict[str, list[float]] = {}
    for rec in records:
        groups.setdefault(rec["group"], []).append(rec["tuco"])
    names = list(groups)
    summary = {}
    for name in names:
        values = torch.tensor(groups[name], dtype=torch.float64)
        summary[name] = {"n": len(values), "mean": float(values.mean()),
                         "std": float(values.std()) if len(values) > 1 else 0.0,
                         "auc_vs_first": auc(groups[name], groups[names[0]]) if name != names[0] else None}
    ptc_mean = torch.tensor([r["ptc_l1"] for r in records]).mean(0).tolist()
    ftc_mean = torch.tensor([r["ftc_l1"] for r in records]).mean(0).tolist()

    rows = [[r["group"], (r["prompt"][:48] + "...") if len(r["prompt"]) > 48 else r["prompt"], r["tuco"]]
            for r in records]
    table = format_table(["group", "prompt", "TuCo"], rows) + "\n\n" + format_table(
        ["group", "n", "mean TuCo", "std", f"AUC(group > {names[0]})"],
        [[n, s["n"], s["mean"], s["std"], "-" if s["auc_vs_first"] is None else s["auc_vs_first"]]
         for n, s in summary.items()])
    table += "\n\n" + format_table(["layer", "mean |PTC|_1", "mean |FTC|_1"],
                                   [[i, p, f] for i, (p, f) in enumerate(zip(ptc_mean, ftc_mean))])

    fig, (ax_layers, ax_prompts) = new_figure(2)
    layers = list(range(len(ptc_mean)))
    ax_layers.bar([x - 0.2 for x in layers], ptc_mean, width=0.4, label="PTC")
    ax_layers.bar([x + 0.2 for x in layers], ftc_mean, width=0.4, label="FTC")
    ax_layers.set(xlabel="layer", ylabel="mean L1 norm, last prompt token", title="components per layer")
    ax_layers.legend()
    for position, name in enumerate(names):
        ax_prompts.scatter([position] * len(groups[name]), groups[name], alpha=0.7)
    ax_prompts.set_xticks(range(len(names)), names)
    ax_prompts.set(ylabel="TuCo", ylim=(0, 1), title="TuCo per prompt")
    steering = steer(pair, [p for _, p, chat in items if chat][: args.steer_prompts], args)
    if steering:
        cells = [[s["alpha"], s["prompt"][:32], s["completion"][:60].replace("\n", " ")] for s in steering]
        table += "\n\n" + format_table(["alpha", "prompt", "completion"], cells)
    record = {"base": pair.names[0], "tuned": pair.names[1], "shared_backbone": pair.shared, "norm": "L1",
              "position": "last prompt token", "groups": summary,
              "layers": {"ptc_l1": ptc_mean, "ftc_l1": ftc_mean}, "prompts": records, "steering": steering}
    return Report(table, record, fig)


def parse_alphas(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        return [float(a) for a in text.split(",") if a.strip()]
    except ValueError as err:
        raise ConfigError(f"--alphas {text!r}: expected numbers separated by commas, e.g. 0,0.5,1") from err


def steer(pair, prompts: list[str], args: argparse.Namespace) -> list[dict]:
    """Greedy completions of ``prompts`` by the tuned module with its FTC scaled by each alpha
    (:class:`~zoo.modules.analysis.tuco.FTCScaler`, through the module's own generation)."""
    alphas = parse_alphas(args.alphas)
    if not alphas or not prompts:
        return []
    module = pair.module
    blocks = BlockPair.for_module(module, pair.separate_base)
    rows = []
    for alpha in alphas:
        with FTCScaler(alpha).applied(blocks):
            outputs = generate_for_module(module, prompts, max_new_tokens=args.max_new_tokens,
                                          system_prompt=args.system_prompt)
        rows += [{"alpha": alpha, "prompt": p, "completion": c} for p, c in zip(prompts, outputs)]
    return rows

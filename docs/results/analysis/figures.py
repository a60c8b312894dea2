"""Build the committed figures of docs/results/analysis/ from the `zoo analyze` outputs of the SmolLM2 runs.

    python docs/results/analysis/figures.py --runs /work/benchruns/analysis [STUDY ...]   # default: all

Each study reads the tool JSONs under ``--runs`` (the commands are in each folder's README.md), copies them
next to this file (``<study>/<tool>.json`` and ``.png``), and writes one summary JSON + PNG + table
(``<study>/summary.json``, ``summary.png``, ``summary.md``). Confidence intervals are percentile bootstraps
over prompts / items (1000 resamples, seed 0), the same as ``zoo.harness.rag.stats``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent


def bootstrap(values, resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    return float(data.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def copy_tool(runs: Path, run: str, tool: str, dest: Path, name: str) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    source = runs / run
    shutil.copy(source / f"{tool}.json", dest / f"{name}.json")
    if (source / f"{tool}.png").exists():
        shutil.copy(source / f"{tool}.png", dest / f"{name}.png")
    return json.loads((source / f"{tool}.json").read_text())


def md_table(headers, rows) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(dest: Path, table: str, summary: dict) -> None:
    """``summary.md`` (the tables) and ``summary.json`` (every figure behind them) of one study."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "summary.md").write_text(table, encoding="utf-8")
    (dest / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def save_figure(fig, dest: Path) -> None:
    fig.tight_layout()
    fig.savefig(dest / "summary.png", dpi=110)
    plt.close(fig)


def ci_bars(ax, entries: list[dict], models: tuple[str, ...]) -> None:
    """Grouped bars, one group per entry: ``entry[model]["mean"]`` with its [low, high] interval."""
    for offset, model in enumerate(models):
        means = [e[model]["mean"] for e in entries]
        err = [[m - e[model]["low"] for m, e in zip(means, entries)],
               [e[model]["high"] - m for m, e in zip(means, entries)]]
        ax.bar([i + 0.27 * (offset - 1) for i in range(len(means))], means, width=0.27, yerr=err, capsize=2,
               label=model)


# ------------------------------------------------------------------------------------------------- TuCo
def tuco(runs: Path) -> None:
    dest = HERE / "tuco"
    records = {
        label: copy_tool(runs, f"tuco_{label.lower()}", "tuco", dest, f"tuco_{label.lower()}")
        for label in ("SFT", "LoRA")
    }
    summary, rows = {}, []
    for label, record in records.items():
        groups = list(dict.fromkeys(p["group"] for p in record["prompts"]))
        summary[label] = {"groups": {}, "layer_ratio": {}}
        for group in groups:
            prompts = [p for p in record["prompts"] if p["group"] == group]
            mean, low, high = bootstrap([p["tuco"] for p in prompts])
            ptc = np.array([p["ptc_l1"] for p in prompts])
            ftc = np.array([p["ftc_l1"] for p in prompts])
            per_layer = (ftc / (ptc + ftc)).mean(0)  # per-layer FTC share, mean over prompts
            summary[label]["groups"][group] = {
                "n": len(prompts),
                "tuco": mean,
                "low": low,
                "high": high,
                "auc_vs_first": record["groups"][group]["auc_vs_first"],
            }
            summary[label]["layer_ratio"][group] = per_layer.tolist()
            auc = record["groups"][group]["auc_vs_first"]
            rows.append(
                [
                    label,
                    group,
                    len(prompts),
                    mean,
                    f"[{low:.4f}, {high:.4f}]",
                    "-" if auc is None else f"{auc:.3f}",
                    f"{per_layer.argmax()} ({per_layer.max():.4f})",
                ]
            )
        summary[label]["steering"] = record["steering"]
    table = md_table(
        [
            "tuned",
            "probe group",
            "n",
            "mean TuCo",
            "95% CI",
            "AUC(group > chain_sum)",
            "layer with max FTC share",
        ],
        rows,
    )
    paired = []  # LoRA - SFT on the same prompts
    sft, lora = records["SFT"]["prompts"], records["LoRA"]["prompts"]
    for group in dict.fromkeys(p["group"] for p in sft):
        diff = [b["tuco"] - a["tuco"] for a, b in zip(sft, lora) if a["group"] == group]
        assert all(a["prompt"] == b["prompt"] for a, b in zip(sft, lora))
        mean, low, high = bootstrap(diff)
        higher = sum(d > 0 for d in diff)
        summary.setdefault("lora_minus_sft", {})[group] = {
            "delta": mean,
            "low": low,
            "high": high,
            "lora_higher": higher,
            "n": len(diff),
        }
        paired.append([group, len(diff), mean, f"[{low:.4f}, {high:.4f}]", f"{higher}/{len(diff)}"])
    table += "\nPaired LoRA - SFT TuCo on the same prompts:\n\n" + md_table(
        ["probe group", "n", "mean delta", "95% CI", "prompts with LoRA higher"], paired
    )
    steer_rows = [
        [label, s["alpha"], s["prompt"][-28:], s["completion"].replace("\n", " / ")[:70]]
        for label, record in records.items()
        for s in record["steering"]
    ]
    table += (
        "\nFTC steering (greedy, 32 new tokens; alpha = 0 is the base for LoRA, not exactly for SFT, "
        "whose embeddings moved):\n\n"
    )
    table += md_table(["tuned", "alpha", "prompt (end)", "completion"], steer_rows)
    write_summary(dest, table, summary)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (label, data) in zip(axes[:2], summary.items()):
        for group, ratio in data["layer_ratio"].items():
            ax.plot(range(len(ratio)), ratio, marker=".", label=group)
        ax.set(
            title=f"{label}: per-layer FTC share |FTC_l|/(|PTC_l|+|FTC_l|)",
            xlabel="layer",
            ylabel="mean over prompts (last prompt token, L1)",
        )
        ax.legend(fontsize=7)
    ax = axes[2]
    for offset, label in enumerate(("SFT", "LoRA")):  # not "lora_minus_sft": it has no groups
        data = summary[label]
        names = list(data["groups"])
        means = [data["groups"][g]["tuco"] for g in names]
        err = [
            [m - data["groups"][g]["low"] for g, m in zip(names, means)],
            [data["groups"][g]["high"] - m for g, m in zip(names, means)],
        ]
        ax.errorbar(
            [i + 0.15 * offset for i in range(len(names))], means, yerr=err, fmt="o", capsize=3, label=label
        )
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax.set(title="TuCo per probe group (mean, 95% bootstrap CI)", ylabel="TuCo")
    ax.legend()
    save_figure(fig, dest)
    print(table)


def paired(a, b) -> tuple[float, float, float]:
    """Mean of a - b over the same items with its percentile bootstrap CI."""
    return bootstrap(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))


def ci_text(mean: float, low: float, high: float) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def verdict(low: float, high: float, positive: str, negative: str, n: int) -> str:
    if low > 0:
        return positive
    if high < 0:
        return negative
    return f"inconclusive at n={n}"


# ----------------------------------------------------------------------------------------------- checklist
CHECKLIST_LABELS = ("base", "SFT", "LoRA", "URIAL")


def checklist_record(runs: Path) -> tuple[dict, dict]:
    record = json.loads((runs / "checklist" / "checklist.json").read_text())
    keys = ["base", *record["models"][1:]]
    labels = dict(zip(keys, CHECKLIST_LABELS))
    scores = {labels[k]: v for k, v in record["scores"].items()}
    return record, scores


def checklist(runs: Path) -> None:
    dest = HERE / "checklist"
    record = copy_tool(runs, "checklist", "checklist", dest, "checklist")
    _, scores = checklist_record(runs)
    keys = ["base", *record["models"][1:]]
    labels = dict(zip(keys, CHECKLIST_LABELS))
    rows, summary = [], {"models": dict(zip(CHECKLIST_LABELS, record["models"])), "tasks": [], "axes": []}
    tasks = [(t, m) for t, per in scores["SFT"].items() for m in per]
    for task, metric in tasks:
        axis = next(r["axis"] for r in record["rows"] if r["task"] == task)
        cells = {}
        for model in ("base", "SFT", "LoRA"):
            cells[model] = bootstrap(scores[model][task][metric])
        diff = paired(scores["LoRA"][task][metric], scores["SFT"][task][metric])
        n = len(scores["SFT"][task][metric])
        efficiency = axis == "efficiency"
        call = "-" if efficiency else verdict(diff[1], diff[2], "LoRA higher", "SFT higher", n)
        summary["tasks"].append(
            {
                "axis": axis,
                "task": task,
                "metric": metric,
                "n": n,
                **{m: dict(zip(("mean", "low", "high"), v)) for m, v in cells.items()},
                "lora_minus_sft": dict(zip(("delta", "low", "high"), diff)),
                "verdict": call,
            }
        )
        fmt = (lambda v: f"{v[0]:.3g}") if efficiency else (lambda v: ci_text(*v))
        rows.append(
            [
                axis,
                task,
                metric,
                n,
                fmt(cells["base"]),
                fmt(cells["SFT"]),
                fmt(cells["LoRA"]),
                fmt(diff),
                call,
            ]
        )
    table = md_table(
        ["axis", "task", "metric", "n", "base", "SFT", "LoRA", "LoRA − SFT (paired)", "reading"], rows
    )
    axis_rows = []
    for axis in dict.fromkeys(t["axis"] for t in summary["tasks"] if t["axis"] != "efficiency"):
        row = {}
        for model in ("base", "SFT", "LoRA"):
            r = next(
                x
                for x in record["rows"]
                if x["task"] == "(axis)" and x["axis"] == axis and labels[x["model"]] == model
            )
            row[model] = (r["mean"], r["low"], r["high"])
            if model != "base" and "delta_delta" in r:
                row[model + " − base"] = (r["delta_delta"], r["delta_low"], r["delta_high"])
        summary["axes"].append(
            {"axis": axis, **{k: dict(zip(("mean", "low", "high"), v)) for k, v in row.items()}}
        )
        axis_rows.append(
            [
                axis,
                *(
                    ci_text(*row[k]) if k in row else "-"
                    for k in ("base", "SFT", "LoRA", "SFT − base", "LoRA − base")
                ),
            ]
        )
    table += "\nPer axis (headline metrics pooled over items, 95% bootstrap CI; deltas paired vs base):\n\n"
    table += md_table(["axis", "base", "SFT", "LoRA", "SFT − base", "LoRA − base"], axis_rows)
    if record.get("contamination"):
        table += "\nContamination (word 13-grams, chain_sum train split vs every eval set):\n\n" + md_table(
            ["train", "eval", "items", "flagged", "rate"],
            [[h["train"], h["eval"], h["items"], h["flagged"], h["rate"]] for h in record["contamination"]],
        )
    write_summary(dest, table, summary)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    axes_names = [a["axis"] for a in summary["axes"]]
    ci_bars(ax, summary["axes"], ("base", "SFT", "LoRA"))
    ax.set_xticks(range(len(axes_names)), axes_names)
    ax.set(ylabel="headline score (mean over items)", title="alignment checklist: SmolLM2 base, SFT, LoRA")
    ax.legend()
    save_figure(fig, dest)
    print(table)


# ------------------------------------------------------------------------------------------------- URIAL
CHAT_TASKS = (
    "format_constraints",
    "harmful_refusal",
    "benign_compliance",
    "closed_book_facts",
    "country_names_de",
)


def urial(runs: Path) -> None:
    dest = HERE / "urial"
    record, scores = checklist_record(runs)
    summary, rows = {"tasks": [], "shift": {}}, []
    for task in CHAT_TASKS:
        for metric, _ in scores["base"][task].items():
            n = len(scores["base"][task][metric])
            cells = {m: bootstrap(scores[m][task][metric]) for m in ("base", "SFT", "URIAL")}
            d_urial = paired(scores["URIAL"][task][metric], scores["base"][task][metric])
            d_sft = paired(scores["SFT"][task][metric], scores["base"][task][metric])
            d_us = paired(scores["URIAL"][task][metric], scores["SFT"][task][metric])
            summary["tasks"].append(
                {
                    "task": task,
                    "metric": metric,
                    "n": n,
                    **{m: dict(zip(("mean", "low", "high"), v)) for m, v in cells.items()},
                    "urial_minus_base": dict(zip(("delta", "low", "high"), d_urial)),
                    "sft_minus_base": dict(zip(("delta", "low", "high"), d_sft)),
                    "urial_minus_sft": dict(zip(("delta", "low", "high"), d_us)),
                }
            )
            rows.append(
                [
                    task,
                    metric,
                    n,
                    *(ci_text(*cells[m]) for m in ("base", "SFT", "URIAL")),
                    ci_text(*d_urial),
                    ci_text(*d_sft),
                    ci_text(*d_us),
                ]
            )
    table = md_table(
        ["task", "metric", "n", "base", "SFT", "URIAL (K=3)", "URIAL − base", "SFT − base", "URIAL − SFT"],
        rows,
    )
    shift_rows = []
    for label, run in (("SFT vs base", "shift_sft"), ("URIAL vs base (prefix off)", "shift_urial")):
        if not (runs / run / "urial-shift.json").exists():
            continue
        rec = copy_tool(runs, run, "urial-shift", dest, run)
        summary["shift"][label] = {k: rec[k] for k in ("positions", "ratios", "mean_kl", "top_shifted")}
        shift_rows.append(
            [
                label,
                rec["positions"],
                *(f"{rec['ratios'][k]:.3f}" for k in ("unshifted", "marginal", "shifted")),
                f"{rec['mean_kl']:.3f}",
                ", ".join(f"{t!r}×{c}" for t, c in rec["top_shifted"][:8]),
            ]
        )
    if shift_rows:
        table += (
            "\nToken distribution shift (the tool's 6 built-in chat prompts, 32 new tokens, greedy):\n\n"
            + md_table(
                [
                    "aligned model",
                    "positions",
                    "unshifted",
                    "marginal",
                    "shifted",
                    "mean KL",
                    "top shifted tokens",
                ],
                shift_rows,
            )
        )
    write_summary(dest, table, summary)
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    ax = axes[0]
    names = [f"{t['task']}\n{t['metric']}" for t in summary["tasks"]]
    ci_bars(ax, summary["tasks"], ("base", "SFT", "URIAL"))
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set(ylabel="mean over items (95% CI)", title="chat-style checklist tasks")
    ax.legend()
    ax = axes[1]
    for offset, (label, data) in enumerate(summary["shift"].items()):
        ax.bar(
            [i + 0.4 * offset for i in range(3)],
            [data["ratios"][k] for k in ("unshifted", "marginal", "shifted")],
            width=0.4,
            label=label,
        )
    ax.set_xticks([0.2, 1.2, 2.2], ["unshifted", "marginal", "shifted"])
    ax.set(ylabel="fraction of positions", title="token distribution shift vs the base")
    ax.legend(fontsize=8)
    save_figure(fig, dest)
    print(table)


# -------------------------------------------------------------------------------------------- forgetting
FORGET_RUNS = ("SFT", "LoRA", "HFT", "LT-SFT")  # forgetting_probe.py writes OUT/<label>/conjugate.json


NLL_LABELS = {"base": "base", "sft": "SFT", "lora": "LoRA", "hft": "HFT", "lt_sft": "LT-SFT"}


def nll_forgetting(runs: Path, dest: Path) -> list[dict]:
    """Per-problem response NLL (nll_sum / tokens) of every row of the ``zoo bench --ckpt ... --limit 0`` runs
    on gsm_symbolic, with paired deltas vs the base and vs SFT."""
    import gzip

    per_row: dict[str, dict] = {}
    for folder in ("nll_gsm", "nll_gsm_lt"):
        results = runs / folder / "results.jsonl"
        if not results.exists():
            continue
        shutil.copy(results, dest / f"{folder}_results.jsonl")
        for line in results.read_text().splitlines():
            record = json.loads(line)
            name = record["method"].removeprefix("ckpt:").split("-s0")[0]
            label = NLL_LABELS.get(name, NLL_LABELS.get(name.split("_dense")[0], name))
            with gzip.open(runs / folder / record["items"], "rt") as handle:
                items = {
                    (i["id"], i["prompt_sha"]): i["nll_sum"] / i["tokens"] for i in map(json.loads, handle)
                }
            per_row[label] = items
    if "base" not in per_row:
        return []
    keys = sorted(per_row["base"])
    rows = []
    for label in ("base", "SFT", "LoRA", "HFT", "LT-SFT"):
        if label not in per_row:
            continue
        values = [per_row[label][k] for k in keys]
        mean, low, high = bootstrap(values)
        vs_base = None if label == "base" else paired(values, [per_row["base"][k] for k in keys])
        vs_sft = (
            None
            if label in ("base", "SFT") or "SFT" not in per_row
            else paired(values, [per_row["SFT"][k] for k in keys])
        )
        rows.append(
            {
                "row": label,
                "n": len(keys),
                "nll": mean,
                "low": low,
                "high": high,
                "vs_base": vs_base,
                "vs_sft": vs_sft,
            }
        )
    return rows


def forgetting(runs: Path) -> None:
    dest = HERE / "forgetting"
    records = {
        label: copy_tool(runs, f"forget/{label}", "conjugate", dest, f"conjugate_{label}")
        for label in FORGET_RUNS
        if (runs / "forget" / label / "conjugate.json").exists()
    }
    shutil.copy(runs / "forget" / "base.json", dest / "base.json")
    summary, rows, versus = {"methods": {}, "vs_sft": {}}, [], []
    for label, record in records.items():
        summary["methods"][label] = []
        for t in record["transforms"]:
            ci, rec = t["drop_ci"], t["recovery_ci"]
            summary["methods"][label].append(
                {k: t[k] for k in ("transform", "metric", "base", "tuned", "drop", "drop_ci", "recovery_ci")}
            )
            n = ci["n"]
            rows.append(
                [
                    label,
                    t["transform"],
                    n,
                    f"{t['base']:.3f}",
                    f"{t['tuned']:.3f}",
                    ci_text(ci["drop"], ci["low"], ci["high"]),
                    verdict(ci["low"], ci["high"], "forgets", "improves", n),
                    "-" if rec is None else ci_text(rec["recovery"], rec["low"], rec["high"]),
                ]
            )
    table = md_table(
        [
            "method",
            "transform",
            "n",
            "base",
            "tuned",
            "drop = base − tuned (paired CI)",
            "reading",
            "recovery = drop_id − drop_t",
        ],
        rows,
    )
    if "SFT" in records:
        for label, record in records.items():
            if label == "SFT":
                continue
            for t, s in zip(record["transforms"], records["SFT"]["transforms"]):
                assert t["transform"] == s["transform"]
                d = paired(t["tuned_items"], s["tuned_items"])  # same records: forgets less => positive
                n = len(t["tuned_items"])
                summary["vs_sft"].setdefault(label, []).append(
                    {"transform": t["transform"], "delta": d[0], "low": d[1], "high": d[2], "n": n}
                )
                versus.append(
                    [
                        label,
                        t["transform"],
                        n,
                        ci_text(*d),
                        verdict(d[1], d[2], f"{label} forgets less", f"{label} forgets more", n),
                    ]
                )
        table += "\nTuned score minus SFT's on the same items (positive: forgets less than full SFT):\n\n"
        table += md_table(["method", "transform", "n", "method − SFT (paired CI)", "reading"], versus)
    nll_rows = nll_forgetting(runs, dest)
    if nll_rows:
        summary["nll_gsm_symbolic"] = nll_rows
        table += (
            "\nResponse NLL per token on 32 held-out gsm_symbolic worked solutions (off-task; lower is "
            "better; per-problem mean NLL, paired over the same problems):\n\n"
        )
        table += md_table(
            ["row", "NLL", "95% CI", "row − base", "reading", "row − SFT", "reading"],
            [
                [
                    r["row"],
                    f"{r['nll']:.3f}",
                    f"[{r['low']:.3f}, {r['high']:.3f}]",
                    "-" if r["vs_base"] is None else ci_text(*r["vs_base"]),
                    "-"
                    if r["vs_base"] is None
                    else verdict(*r["vs_base"][1:], "higher NLL (forgets)", "lower NLL", r["n"]),
                    "-" if r["vs_sft"] is None else ci_text(*r["vs_sft"]),
                    "-"
                    if r["vs_sft"] is None
                    else verdict(*r["vs_sft"][1:], "higher NLL than SFT", "lower NLL than SFT", r["n"]),
                ]
                for r in nll_rows
            ],
        )
    write_summary(dest, table, summary)
    fig, (ax, ax_nll) = plt.subplots(1, 2, figsize=(13, 3.8))
    if nll_rows:
        tuned = [r for r in nll_rows if r["vs_base"] is not None]
        ax_nll.bar(
            range(len(tuned)),
            [r["vs_base"][0] for r in tuned],
            color="tab:purple",
            yerr=[
                [r["vs_base"][0] - r["vs_base"][1] for r in tuned],
                [r["vs_base"][2] - r["vs_base"][0] for r in tuned],
            ],
            capsize=3,
        )
        ax_nll.axhline(0, color="black", lw=0.8)
        ax_nll.set_xticks(range(len(tuned)), [r["row"] for r in tuned])
        ax_nll.set(
            ylabel="NLL/token: row − base (paired 95% CI)",
            title="off-task gsm_symbolic worked solutions (> 0: forgetting)",
        )
    transforms = [t["transform"] for t in next(iter(records.values()))["transforms"]]
    width = 0.8 / max(1, len(records))
    for offset, (label, record) in enumerate(records.items()):
        drops = [t["drop_ci"] for t in record["transforms"]]
        ax.bar(
            [i + width * (offset - (len(records) - 1) / 2) for i in range(len(drops))],
            [d["drop"] for d in drops],
            width=width,
            capsize=2,
            label=label,
            yerr=[[d["drop"] - d["low"] for d in drops], [d["high"] - d["drop"] for d in drops]],
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(transforms)), transforms)
    ax.set(ylabel="drop = base − tuned (paired 95% CI)", title="forgetting on basic_arithmetic per transform")
    ax.legend()
    save_figure(fig, dest)
    print(table)


# --------------------------------------------------------------------------------------------------- RAG
def rag(runs: Path, run: str = "rag") -> None:
    """``run``: the ``--out`` folder under ``runs`` (``rag``: n in {20, 50, 100}; ``rag_full``: the spec's
    n in {200, 500, 1000}); the summary goes to the folder of the same name here."""
    dest = HERE / run
    record = copy_tool(runs, run, "rag", dest, "rag")
    items = record.pop("items", {})
    rows, summary = (
        [],
        {
            "settings": record["settings"],
            "hit_rate": record["hit_rate"],
            "rows": record["rows"],
            "answer_tokens": record["answer_tokens"],
        },
    )
    for r in record["rows"]:
        delta = "delta_delta" in r
        n = len(items.get(r["model"], [])) or record["settings"]["test_items"]
        rows.append(
            [
                r["model"],
                r["metric"],
                ci_text(r["mean"], r["low"], r["high"]),
                ci_text(r["delta_delta"], r["delta_low"], r["delta_high"]) if delta else "-",
                f"{r['delta_wins']}/{r['delta_losses']}/{r['delta_ties']}" if delta else "-",
                f"{r['delta_sign_p']:.3f}" if delta else "-",
                verdict(r["delta_low"], r["delta_high"], "above base", "below base", n) if delta else "-",
            ]
        )
    table = md_table(
        ["model", "metric", "mean [95% CI]", "Δ vs base (paired)", "W/L/T", "sign p", "reading"], rows
    )
    table += (
        f"\nRetrieval hit rate (gold passage in top {record['settings']['k']}): {record['hit_rate']:.3f}; "
        "mean answer length (words): "
        + ", ".join(f"{k} {v:.1f}" for k, v in record["answer_tokens"].items())
        + "\n"
    )
    write_summary(dest, table, summary)
    metrics = list(dict.fromkeys(r["metric"] for r in record["rows"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        base = next(r for r in record["rows"] if r["model"] == "base" and r["metric"] == metric)
        tuned = [r for r in record["rows"] if r["model"] != "base" and r["metric"] == metric]
        ax.axhspan(base["low"], base["high"], color="grey", alpha=0.2)
        ax.axhline(base["mean"], color="black", lw=1, label="base")
        ax.errorbar(
            range(len(tuned)),
            [r["mean"] for r in tuned],
            capsize=3,
            fmt="o-",
            label="fine-tuned",
            yerr=[[r["mean"] - r["low"] for r in tuned], [r["high"] - r["mean"] for r in tuned]],
        )
        ax.set_xticks(range(len(tuned)), [r["model"] for r in tuned])
        ax.set(title=metric, ylabel="mean over questions (95% CI)")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, dest)
    print(table)


STUDIES = {"tuco": tuco, "checklist": checklist, "urial": urial, "forgetting": forgetting, "rag": rag,
           "rag_full": lambda runs: rag(runs, "rag_full")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="/work/benchruns/analysis")
    parser.add_argument("studies", nargs="*", default=list(STUDIES))
    args = parser.parse_args()
    for study in args.studies:
        STUDIES[study](Path(args.runs))


if __name__ == "__main__":
    main()

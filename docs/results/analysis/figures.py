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


# ------------------------------------------------------------------------------------------------- TuCo
def tuco(runs: Path) -> None:
    dest = HERE / "tuco"
    records = {label: copy_tool(runs, f"tuco_{label.lower()}", "tuco", dest, f"tuco_{label.lower()}")
               for label in ("SFT", "LoRA")}
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
            summary[label]["groups"][group] = {"n": len(prompts), "tuco": mean, "low": low, "high": high,
                                               "auc_vs_first": record["groups"][group]["auc_vs_first"]}
            summary[label]["layer_ratio"][group] = per_layer.tolist()
            auc = record["groups"][group]["auc_vs_first"]
            rows.append([label, group, len(prompts), mean, f"[{low:.4f}, {high:.4f}]",
                         "-" if auc is None else f"{auc:.3f}",
                         f"{per_layer.argmax()} ({per_layer.max():.4f})"])
        summary[label]["steering"] = record["steering"]
    table = md_table(["tuned", "probe group", "n", "mean TuCo", "95% CI", "AUC(group > chain_sum)",
                      "layer with max FTC share"], rows)
    paired = []  # LoRA - SFT on the same prompts
    sft, lora = records["SFT"]["prompts"], records["LoRA"]["prompts"]
    for group in dict.fromkeys(p["group"] for p in sft):
        diff = [b["tuco"] - a["tuco"] for a, b in zip(sft, lora) if a["group"] == group]
        assert all(a["prompt"] == b["prompt"] for a, b in zip(sft, lora))
        mean, low, high = bootstrap(diff)
        higher = sum(d > 0 for d in diff)
        summary.setdefault("lora_minus_sft", {})[group] = {"delta": mean, "low": low, "high": high,
                                                         "lora_higher": higher, "n": len(diff)}
        paired.append([group, len(diff), mean, f"[{low:.4f}, {high:.4f}]", f"{higher}/{len(diff)}"])
    table += "\nPaired LoRA - SFT TuCo on the same prompts:\n\n" + md_table(
        ["probe group", "n", "mean delta", "95% CI", "prompts with LoRA higher"], paired)
    steer_rows = [[label, s["alpha"], s["prompt"][-28:], s["completion"].replace("\n", " / ")[:70]]
                  for label, record in records.items() for s in record["steering"]]
    table += ("\nFTC steering (greedy, 32 new tokens; alpha = 0 is the base for LoRA, not exactly for SFT, "
              "whose embeddings moved):\n\n")
    table += md_table(["tuned", "alpha", "prompt (end)", "completion"], steer_rows)
    (dest / "summary.md").write_text(table, encoding="utf-8")
    (dest / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (label, data) in zip(axes[:2], summary.items()):
        for group, ratio in data["layer_ratio"].items():
            ax.plot(range(len(ratio)), ratio, marker=".", label=group)
        ax.set(title=f"{label}: per-layer FTC share |FTC_l|/(|PTC_l|+|FTC_l|)", xlabel="layer",
               ylabel="mean over prompts (last prompt token, L1)")
        ax.legend(fontsize=7)
    ax = axes[2]
    for offset, (label, data) in enumerate(summary.items()):
        names = list(data["groups"])
        means = [data["groups"][g]["tuco"] for g in names]
        err = [[m - data["groups"][g]["low"] for g, m in zip(names, means)],
               [data["groups"][g]["high"] - m for g, m in zip(names, means)]]
        ax.errorbar([i + 0.15 * offset for i in range(len(names))], means, yerr=err, fmt="o", capsize=3,
                    label=label)
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax.set(title="TuCo per probe group (mean, 95% bootstrap CI)", ylabel="TuCo")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest / "summary.png", dpi=110)
    plt.close(fig)
    print(table)


STUDIES = {"tuco": tuco}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="/work/benchruns/analysis")
    parser.add_argument("studies", nargs="*", default=list(STUDIES))
    args = parser.parse_args()
    for study in args.studies:
        STUDIES[study](Path(args.runs))


if __name__ == "__main__":
    main()

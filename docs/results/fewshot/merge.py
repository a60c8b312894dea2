"""Merge the part folders of a few-shot bench (parallel `zoo bench` streams, one `--out` each) into one
``results.jsonl`` + ``items/`` and write the bench report (``results.md``, ``results.png``).

    python docs/results/fewshot/merge.py /work/benchruns/fewshot/sentiment_hard-k4 pet_lora [ubpl:1 ...]

merges ``OUT/parts/*/`` into ``OUT`` with ``pet_lora`` as the paired-CI reference; ``method:seed`` arguments
leave those records out (a seed that only repeats another: UBPL samples with its own ``seed`` init argument,
so bench seeds 0 and 1 gave the same run).
"""

import json
import shutil
import sys
from pathlib import Path

from zoo.harness.bench.records import load_results
from zoo.harness.bench.report import markdown, write_report


def merge(out: Path, reference: str, drop: tuple[str, ...] = ()) -> str:
    records = []
    shutil.rmtree(out / "items", ignore_errors=True)  # only the kept records' items
    for part in sorted((out / "parts").iterdir()):
        for record in load_results(part / "results.jsonl"):
            if f"{record['method']}:{record.get('seed')}" in drop:
                continue
            records.append(record)
            if record.get("items"):
                target = out / record["items"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(part / record["items"], target)
    (out / "results.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    known = {r["method"] for r in records}
    return markdown(write_report(out / "results.jsonl", out, reference if reference in known else None))


if __name__ == "__main__":
    print(merge(Path(sys.argv[1]), sys.argv[2], tuple(sys.argv[3:])))

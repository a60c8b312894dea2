"""Merge the part folders of one bench (parallel ``zoo bench`` streams, one ``--out`` each, e.g. one per CPU
core) into one ``results.jsonl`` + ``items/`` and write its report (``results.md``, ``results.png``):

    python -m zoo.harness.bench.merge OUT REFERENCE [METHOD:SEED ...]

merges ``OUT/parts/*/`` into ``OUT`` with ``REFERENCE`` as the paired-CI row (ignored when no record has that
method). ``METHOD:SEED`` arguments leave those records out (a seed that only repeats another run).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from zoo.harness.bench.records import BenchError, load_results
from zoo.harness.bench.report import markdown, write_report


def merge(out: Path, reference: str | None, drop: tuple[str, ...] = ()) -> str:
    """Merge ``out/parts/*`` into ``out``; returns the report's markdown table."""
    parts = sorted(p for p in (out / "parts").iterdir() if p.is_dir()) if (out / "parts").is_dir() else []
    if not parts:
        raise BenchError(f"no part folders under {out / 'parts'}: pass the folder that holds parts/<stream>/")
    records = []
    shutil.rmtree(out / "items", ignore_errors=True)  # only the kept records' items
    for part in parts:
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(merge(Path(args[0]), args[1], tuple(args[2:])))
    except BenchError as err:
        print(f"zoo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

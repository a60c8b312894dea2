"""The LeMo method benchmark (``python -m zoo.harness.bench_lemo``) runs end to end on a tiny backbone."""

from __future__ import annotations

import math

from zoo.harness import bench_lemo


def test_bench_lemo_table_shows_lemo_saving_activations_and_finite_perplexities(tmp_path):
    out = tmp_path / "lemo.md"
    table = bench_lemo.main(["--model", "tiny-llama", "--layers", "2", "--hidden", "64", "--lengths", "128",
                             "--block", "8", "--steps", "1", "--settings", "dense", "lemo k=0.25 +mlp0.8",
                             "--ppl-steps", "2", "--ppl-length", "64", "--out", str(out)])
    assert out.read_text() == table
    rows = {line.split(" | ")[1]: line.strip("| ").split(" | ") for line in table.splitlines()
            if line.startswith("| 128 |")}
    assert set(rows) == {"dense", "lemo k=0.25 +mlp0.8"}
    dense_saved, lemo_saved = float(rows["dense"][2]), float(rows["lemo k=0.25 +mlp0.8"][2])
    assert 0 < lemo_saved < dense_saved  # layer 1 keeps 1 of 4 blocks and saves 20% of MLP channels
    ppl = [line.strip("| ").split(" | ") for line in table.splitlines()
           if line.startswith(("| dense |", "| lemo k=0.25 +mlp0.8 |"))]
    assert len(ppl) == 2 and all(math.isfinite(float(row[1])) for row in ppl)
    assert ppl[1][3] != "-"  # LeMo also reports the perplexity with elimination left on

"""``zoo bench --reference`` end to end on the tiny backbone: per-item records, paired-difference columns,
stored resolved configs and ``--rerun`` reproducing a row."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zoo.cli import main as zoo_main
from zoo.harness.bench.items import read_items
from zoo.registry import REPO_ROOT

CONFIGS = [str(REPO_ROOT / "configs" / "sft.yaml"), str(REPO_ROOT / "configs" / "lora.yaml")]
TINY_DATA = ["--", "--data.init_args.dataset", "chain_sum", "--data.init_args.num_train", "8",
             "--data.init_args.num_val", "2", "--data.init_args.num_test", "5",
             "--data.init_args.max_length", "256", "--data.init_args.batch_size", "4",
             "--model.init_args.lr", "1e-3", "--model.init_args.warmup_steps", "0",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("paired")
    argv = ["bench", *CONFIGS, "--seeds", "0,1", "--limit", "2", "--max_new_tokens", "4", "--max_steps", "2",
            "--reference", "sft", "--model", "tiny-llama", "--out", str(out)]
    assert zoo_main(argv + TINY_DATA) == 0
    return out


def test_every_record_has_per_item_records(bench_out):
    records = read(bench_out / "results.jsonl")
    assert sorted((r["method"], r["seed"]) for r in records if r["kind"] == "train") == [
        ("lora", 0), ("lora", 1), ("sft", 0), ("sft", 1)]
    for record in records:
        items = read_items(bench_out / record["items"])
        assert [line["id"] for line in items] == list(range(5))  # every test item, NLL for all
        generated = [line for line in items if "completion" in line]
        assert len(generated) == 2 and all("exact_match" in line["scores"] for line in generated)
        # the record's split NLL is the token mean of its items' sums
        total, tokens = sum(line["nll_sum"] for line in items), sum(line["tokens"] for line in items)
        assert tokens == record["metrics"]["nll_tokens"]
        assert total / tokens == pytest.approx(record["metrics"]["nll"], rel=1e-9)
        assert len({line["prompt_sha"] for line in items}) == 5
        if record["kind"] == "train":
            assert "seed_everything: " + str(record["seed"]) in record["resolved_config"]
            assert record["overrides"] == TINY_DATA[1:] and record["git_commit"]


def test_results_md_has_difference_and_ci_columns(bench_out):
    table = (bench_out / "results.md").read_text()
    lines = table.splitlines()
    header = lines[0]
    assert "Δ exact_match vs sft [95% CI]" in header and "Δ nll vs sft [95% CI]" in header
    lora = next(line for line in lines if line.startswith("| `lora` |"))
    records = read(bench_out / "results.jsonl")
    # the NLL difference cell equals the paired token-weighted difference computed here from the item files
    per = {}
    for record in records:
        if record["kind"] == "train":
            items = read_items(bench_out / record["items"])
            per[(record["method"], record["seed"])] = np.array([line["nll_sum"] for line in items])
            tokens = np.array([line["tokens"] for line in items])
    diff = sum(per[("lora", s)] - per[("sft", s)] for s in (0, 1)).sum() / (2 * tokens.sum())
    cells = [c.strip() for c in lora.strip("|").split("|")]
    nll_cell = cells[header.strip("|").split("|").index(" Δ nll vs sft [95% CI] ")]
    assert nll_cell.startswith(f"{diff:+.4f} [") and "(n=5×2)" in nll_cell
    em_cell = cells[header.strip("|").split("|").index(" Δ exact_match vs sft [95% CI] ")]
    assert "(n=2×2)" in em_cell
    sft = next(line for line in lines if line.startswith("| `sft` |"))
    assert sft.rstrip().endswith("| - | - | - |")  # the reference row has nothing to compare with
    assert "inconclusive" in table  # 2 items cannot separate exact match
    assert (bench_out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_reproduces_a_row_from_its_stored_config(bench_out, tmp_path):
    again = tmp_path / "again"
    argv = ["bench", "--rerun", str(bench_out / "results.jsonl"), "--method", "lora", "--seeds", "1",
            "--out", str(again)]
    assert zoo_main(argv) == 0
    original = next(r for r in read(bench_out / "results.jsonl") if r["method"] == "lora" and r["seed"] == 1)
    (rerun,) = read(again / "results.jsonl")
    assert rerun["method"] == "lora" and rerun["seed"] == 1 and rerun["steps"] == original["steps"]
    assert rerun["rerun_of"].endswith(":lora:s1")
    assert rerun["metrics"]["nll"] == pytest.approx(original["metrics"]["nll"], abs=1e-6)
    assert rerun["metrics"]["nll_tokens"] == original["metrics"]["nll_tokens"]


def test_rerun_errors_are_one_line(bench_out, tmp_path, capsys):
    results = str(bench_out / "results.jsonl")
    for argv, needle in ((["--rerun", results], "--method"),
                         (["--rerun", results, "--method", "nope"], "'nope'"),
                         (["--rerun", results, "--method", "sft", "--seeds", "7"], "--seeds"),
                         (["--rerun", str(tmp_path / "x.jsonl"), "--method", "sft"], "no such file")):
        assert zoo_main(["bench", *argv, "--out", str(tmp_path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_unknown_reference_names_the_rows(bench_out):
    from zoo.harness.bench.records import BenchError
    from zoo.harness.bench.report import write_report

    before = (bench_out / "results.md").read_text()
    with pytest.raises(BenchError, match=r"--reference nope: no such row .*base, lora, sft"):
        write_report(bench_out / "results.jsonl", bench_out, "nope")
    assert (bench_out / "results.md").read_text() == before


def test_merge_joins_part_folders_into_one_report(bench_out, tmp_path):
    """Two streams' ``--out`` folders (here: the bench's records split by method) merge into the same
    records, items and paired columns as one folder; ``METHOD:SEED`` leaves a record out."""
    import shutil

    from zoo.harness.bench.merge import main as merge_main

    records = read(bench_out / "results.jsonl")
    for stream, methods in (("A", {"base", "sft"}), ("B", {"lora"})):
        part = tmp_path / "parts" / stream
        part.mkdir(parents=True)
        mine = [r for r in records if r["method"] in methods]
        (part / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mine))
        for record in mine:
            (part / record["items"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bench_out / record["items"], part / record["items"])
    assert merge_main([str(tmp_path), "sft", "lora:1"]) == 0
    merged = read(tmp_path / "results.jsonl")
    expected = [r for r in records if (r["method"], r.get("seed")) != ("lora", 1)]
    assert sorted(json.dumps(r, sort_keys=True) for r in merged) == sorted(
        json.dumps(r, sort_keys=True) for r in expected)
    for record in merged:
        assert read_items(tmp_path / record["items"]) == read_items(bench_out / record["items"])
    assert "Δ exact_match vs sft [95% CI]" in (tmp_path / "results.md").read_text()
    assert merge_main([str(tmp_path / "nowhere"), "sft"]) == 1


def test_a_reference_no_row_can_have_fails_before_training(tmp_path, capsys):
    """``--reference`` naming no config, no base row and no earlier record is a one-line error before any
    run trains (it used to surface after the whole sweep, as the report was written)."""
    argv = ["bench", CONFIGS[0], "--seeds", "0", "--max_steps", "2", "--no-base", "--reference", "base",
            "--model", "tiny-llama", "--out", str(tmp_path)]
    assert zoo_main(argv + TINY_DATA) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "--reference base: no row of this bench will have that name (rows: sft)" in err[-1]
    assert not (tmp_path / "results.jsonl").exists()

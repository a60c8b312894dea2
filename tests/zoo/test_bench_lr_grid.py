"""``zoo bench --lr-grid`` on the tiny backbone: grid points scored on the validation NLL, the argmin chosen,
only the chosen run evaluated on test, a rerun adds nothing (zoo.harness.bench.lr_grid)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from zoo.cli import main as zoo_main
from zoo.errors import ZooError
from zoo.harness.bench.lr_grid import choose, parse_rates
from zoo.registry import REPO_ROOT

CONFIG = str(REPO_ROOT / "configs" / "sft.yaml")
RATES = (1e-4, 5e-2)
TINY_DATA = ["--", "--data.init_args.dataset", "chain_sum", "--data.init_args.num_train", "8",
             "--data.init_args.num_val", "3", "--data.init_args.num_test", "3",
             "--data.init_args.max_length", "256", "--data.init_args.batch_size", "4",
             "--model.init_args.warmup_steps", "0",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
ARGV = ["bench", CONFIG, "--lr-grid", ",".join(map(str, RATES)), "--seeds", "0", "--limit", "1",
        "--max_new_tokens", "4", "--max_steps", "2", "--no-base", "--model", "tiny-llama"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def grid_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("lr_grid")
    assert zoo_main([*ARGV, "--out", str(out), *TINY_DATA]) == 0
    return out


def val_nll_by_hand(record) -> float:
    """The grid point's validation response NLL recomputed from its HF export with plain transformers:
    shifted cross entropy over the response tokens (labels != -100) of the validation split."""
    from transformers import AutoModelForCausalLM

    from zoo.harness.bench.evaluation import build_datamodule

    export = f"{record['run_dir']}/export"
    model = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()
    config = yaml.safe_load(record["resolved_config"])
    datamodule, _ = build_datamodule(argparse.Namespace(data_config=None), config, "tiny-llama", [])
    datamodule.setup("validate")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).double(), targets,
                                                       ignore_index=-100, reduction="sum")
            total += float(losses)
            tokens += int((targets != -100).sum())
    return total / tokens


def test_grid_records_and_choice(grid_out):
    records = read(grid_out / "results.jsonl")
    grid = [r for r in records if r["kind"] == "grid"]
    trained = [r for r in records if r["kind"] == "train"]
    assert sorted(r["lr"] for r in grid) == sorted(RATES)
    assert len(trained) == 1  # only the chosen run has a test record
    record = trained[0]
    by_hand = {r["lr"]: val_nll_by_hand(r) for r in grid}
    for point in grid:
        assert point["val_nll"] == pytest.approx(by_hand[point["lr"]], rel=1e-4)
        assert yaml.safe_load(point["resolved_config"])["model"]["init_args"]["lr"] == point["lr"]
    assert by_hand[RATES[0]] != pytest.approx(by_hand[RATES[1]], rel=1e-3)  # the grid really discriminates
    best = min(by_hand, key=by_hand.get)
    assert record["lr_chosen"] == best
    assert {float(k): v for k, v in record["lr_grid"].items()} == {r["lr"]: r["val_nll"] for r in grid}
    chosen_point = next(r for r in grid if r["lr"] == best)
    assert record["run_dir"] == chosen_point["run_dir"]
    assert record["eval_examples"] == 1 and math.isfinite(record["metrics"]["nll"])
    assert "exact_match" in record["metrics"]
    # results.md: one row, the chosen rate in its lr column; grid points are not rows
    lines = (grid_out / "results.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [line for line in lines[2:] if line.startswith("| `")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[header.index("lr")].removesuffix(" *(edge)*")) == best


def test_rerun_adds_nothing(grid_out):
    before = (grid_out / "results.jsonl").read_text()
    assert zoo_main([*ARGV, "--out", str(grid_out), *TINY_DATA]) == 0
    assert (grid_out / "results.jsonl").read_text() == before


def test_interrupted_after_the_grid_resumes_without_retraining(grid_out):
    """A sweep cut off after its grid points but before the test record: the rerun trains nothing, loads the
    chosen run's export and writes the one missing record, with the same choice and test NLL."""
    path = grid_out / "results.jsonl"
    records = read(path)
    trained = next(r for r in records if r["kind"] == "train")
    path.write_text("".join(json.dumps(r) + "\n" for r in records if r["kind"] != "train"))
    assert zoo_main([*ARGV, "--out", str(grid_out), *TINY_DATA]) == 0
    again = read(path)
    assert [r for r in again if r["kind"] == "grid"] == [r for r in records if r["kind"] == "grid"]
    (redone,) = [r for r in again if r["kind"] == "train"]
    assert redone["lr_chosen"] == trained["lr_chosen"] and redone["lr_grid"] == trained["lr_grid"]
    assert redone["metrics"]["nll"] == pytest.approx(trained["metrics"]["nll"], rel=1e-6)


def test_rate_parsing_and_choice():
    assert parse_rates("1e-3, 1e-5,1e-4,1e-3", "--lr-grid") == [1e-5, 1e-4, 1e-3]
    for bad in ("", "fast", "-1e-4", "0", "nan"):
        with pytest.raises(ZooError):
            parse_rates(bad, "--lr-grid")
    assert choose({1e-4: 2.0, 1e-3: 1.5, 1e-2: float("nan")}) == 1e-3
    assert choose({1e-4: 1.5, 1e-3: 1.5}) == 1e-4  # ties: the smaller rate
    with pytest.raises(ZooError):
        choose({1e-3: float("inf")})
    # a generation metric picks (highest), the NLL breaks its ties, then the smaller rate
    assert choose({1e-4: 1.0, 1e-3: 2.0}, {1e-4: 0.1, 1e-3: 0.3}) == 1e-3
    assert choose({1e-4: 1.0, 1e-3: 0.9, 1e-2: 0.9}, {1e-4: 0.2, 1e-3: 0.2, 1e-2: 0.2}) == 1e-3


def test_select_on_validation_exact_match(tmp_path, monkeypatch):
    """--lr-grid-select exact_match: every grid point generates for the whole validation split and keeps its
    completions, which rescore to the recorded metric; the choice follows the metric, not the NLL (a
    stand-in metric that prefers the rate with the higher NLL, since the tiny model's exact match is 0
    everywhere), and the runs never share a folder or a table row with an NLL sweep."""
    from zoo.harness.bench import lr_grid
    from zoo.harness.bench.records import load_results

    real = lr_grid.validation_metrics
    kept = {}

    def stand_in(module, datamodule, args, run_dir):
        metrics = real(module, datamodule, args, run_dir)
        kept[str(run_dir)] = dict(metrics)
        lr = float(module.hparams.lr)
        return {**metrics, "exact_match": 0.5 if lr == min(RATES) else 0.25}  # prefers the smaller rate

    monkeypatch.setattr(lr_grid, "validation_metrics", stand_in)
    out = tmp_path / "select"
    assert zoo_main([*ARGV, "--lr-grid-select", "exact_match", "--out", str(out), *TINY_DATA]) == 0
    records = load_results(out / "results.jsonl")
    grid = [r for r in records if r["kind"] == "grid"]
    (trained,) = [r for r in records if r["kind"] == "train"]
    assert sorted(r["lr"] for r in grid) == sorted(RATES)
    for point in grid:
        assert point["run_dir"].endswith("-selexact_match") and point["budget"]["lr_select"] == "exact_match"
        rows = read(Path(point["run_dir"]) / "val_completions.jsonl")
        assert len(rows) == 3  # the whole validation split (num_val 3), not --limit 1
        real_metric = kept[point["run_dir"]]["exact_match"]
        assert real_metric == pytest.approx(sum(r["exact_match"] for r in rows) / 3)
    nll = {r["lr"]: r["val_nll"] for r in grid}
    assert min(nll, key=nll.get) != min(RATES)  # the NLL would pick the other rate
    assert trained["lr_chosen"] == min(RATES) and trained["lr_grid_select"] == "exact_match"
    assert {float(k): v for k, v in trained["lr_grid_metric"].items()} == {min(RATES): 0.5, max(RATES): 0.25}


def test_select_without_a_grid_is_refused(tmp_path, capsys):
    assert zoo_main(["bench", CONFIG, "--lr-grid-select", "exact_match", "--out", str(tmp_path / "o")]) != 0
    assert "--lr-grid-select exact_match picks a grid's rate" in capsys.readouterr().err


def test_select_refuses_a_metric_the_data_lacks_before_training(tmp_path, capsys):
    out = tmp_path / "bad"
    assert zoo_main([*ARGV, "--lr-grid-select", "bleu", "--out", str(out), *TINY_DATA]) == 1
    error = capsys.readouterr().err
    assert "--lr-grid-select bleu: this data's metrics are exact_match" in error and "Traceback" not in error
    assert not list((out / "runs").glob("*/export"))  # nothing trained


def test_grid_file_names_unknown_method(tmp_path, capsys):
    grids = tmp_path / "grids.yaml"
    grids.write_text("sfft: [1e-4, 1e-3]\n")
    assert zoo_main(["bench", CONFIG, "--lr-grid-file", str(grids), "--out", str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err
    assert "sfft is not among the configs' methods (sft)" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_next_rate_walks_the_half_decade_ladder_from_the_edge():
    from zoo.harness.bench.lr_grid import next_rate

    assert next_rate([1e-5, 3e-5, 1e-4], 1e-4) == pytest.approx(3e-4)
    assert next_rate([1e-4, 3e-4], 3e-4) == pytest.approx(1e-3)
    assert next_rate([1e-5, 1e-4], 1e-5) == pytest.approx(3e-6)
    assert next_rate([3e-5, 1e-4], 3e-5) == pytest.approx(1e-5)
    assert next_rate([1e-5, 3e-5, 1e-4], 3e-5) is None  # interior: nothing to add
    assert next_rate([1e-4], 1e-4) is None


def test_grow_adds_a_rate_beyond_the_edge_the_choice_sits_on(tmp_path):
    """``--lr-grid-grow 1``: when the grid's largest rate wins, one half-decade more is trained and the choice
    is the argmin over every rate trained; the test record lists them all."""
    argv = ["bench", CONFIG, "--lr-grid", "1e-4,1e-3", "--lr-grid-grow", "1", "--seeds", "0", "--limit", "1",
            "--max_new_tokens", "4", "--max_steps", "2", "--no-base", "--model", "tiny-llama"]
    assert zoo_main([*argv, "--out", str(tmp_path), *TINY_DATA]) == 0
    records = read(tmp_path / "results.jsonl")
    val = {r["lr"]: r["val_nll"] for r in records if r["kind"] == "grid"}
    assert val[1e-3] < val[1e-4], "the precondition: the initial grid's largest rate wins"
    assert sorted(val) == pytest.approx([1e-4, 1e-3, 3e-3])
    (trained,) = [r for r in records if r["kind"] == "train"]
    assert trained["lr_chosen"] == choose(val) and len(trained["lr_grid"]) == 3


def test_grow_without_a_grid_is_refused(tmp_path, capsys):
    assert zoo_main(["bench", CONFIG, "--lr-grid-grow", "1", "--out", str(tmp_path / "out")]) != 0
    assert "--lr-grid-grow extends a grid" in capsys.readouterr().err


def test_results_md_marks_a_rate_chosen_at_the_grid_edge(grid_out, tmp_path):
    """A two-rate grid's choice is always an edge: the lr cell says so and the note names --lr-grid-grow;
    the same record with its choice inside a wider grid is not marked."""
    from zoo.harness.bench.report import lr_at_edge, write_report

    table = (grid_out / "results.md").read_text()
    assert "*(edge)*" in table and "--lr-grid-grow" in table
    (trained,) = [r for r in read(grid_out / "results.jsonl") if r["kind"] == "train"]
    assert lr_at_edge(trained)
    inside = {**trained, "lr_grid": {"1e-06": 3.0, str(trained["lr_chosen"]): 1.0, "10": 9.0}}
    assert not lr_at_edge(inside)
    (tmp_path / "results.jsonl").write_text(json.dumps(inside) + "\n")
    write_report(tmp_path / "results.jsonl", tmp_path)
    assert "*(edge)*" not in (tmp_path / "results.md").read_text()


def test_a_chosen_run_without_its_export_is_trained_again(grid_out, tmp_path):
    """The grid's records continued on a machine without its run folders: the chosen rate is retrained (same
    seed, same validation NLL on this deterministic CPU) and evaluated, the choice unchanged."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(grid_out, copy)
    records = read(grid_out / "results.jsonl")
    trained = next(r for r in records if r["kind"] == "train")
    kept = [r for r in records if r["kind"] != "train"]
    (copy / "results.jsonl").write_text(
        "".join(json.dumps(r).replace(str(grid_out), str(copy)) + "\n" for r in kept))
    chosen = trained["lr_chosen"]
    shutil.rmtree(copy / "runs" / f"sft-s0-steps2-lr{chosen:g}")
    assert zoo_main([*ARGV, "--out", str(copy), *TINY_DATA]) == 0
    again = read(copy / "results.jsonl")
    points = [r for r in again if r["kind"] == "grid" and r["lr"] == chosen]
    assert len(points) == 2  # the original point and its retrained twin
    assert points[1]["val_nll"] == pytest.approx(points[0]["val_nll"], rel=1e-5)
    (redone,) = [r for r in again if r["kind"] == "train"]
    assert redone["lr_chosen"] == chosen
    assert redone["metrics"]["nll"] == pytest.approx(trained["metrics"]["nll"], rel=1e-4)
    assert (copy / "runs" / f"sft-s0-steps2-lr{chosen:g}" / "export").is_dir()

"""``zoo bench`` end to end on the tiny backbone: files, base row, resume, ``--ckpt`` and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoo.cli import main as zoo_main
from zoo.registry import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "smoke" / "tiny.yaml")
SMALL_DATA = ["--", "--data.init_args.num_train", "16", "--data.init_args.num_test", "4",
              "--data.init_args.max_length", "128", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", TINY, "--max_steps", "2", "--limit", "3", "--max_new_tokens", "6", "--out", str(out)]
    assert zoo_main(argv + SMALL_DATA) == 0
    return out, argv


def test_bench_writes_results_with_a_base_row(bench_dir):
    out, _ = bench_dir
    records = read(out / "results.jsonl")
    assert [r["method"] for r in records] == ["base", "tiny"]
    base, tiny = records
    assert base["steps"] == 0 and base["trainable_params"] == 0
    assert tiny["steps"] == 2 and tiny["seed"] == 0 and tiny["eval_examples"] == 3
    assert tiny["trainable_params"] == tiny["total_params"] > 0  # full fine-tuning trains everything
    for record in records:
        assert set(record["metrics"]) >= {"exact_match", "nll", "ppl", "nll_tokens"}
        assert record["metrics"]["ppl"] == pytest.approx(2.718281828 ** record["metrics"]["nll"], rel=1e-6)
        assert record["versions"]["torch"] and record["peak_rss_mb"] > 0
    assert tiny["metrics"]["nll_tokens"] == base["metrics"]["nll_tokens"]  # same held-out tokens
    assert tiny["tokens_per_s"] > 0 and tiny["train_wall_s"] > 0
    table = (out / "results.md").read_text()
    assert "| `base` |" in table and "| `tiny` |" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "runs" / "tiny-s0-steps2" / "export" / "config.json").exists()
    assert len(read(out / "runs" / "tiny-s0-steps2" / "completions.jsonl")) == 3


def test_rerun_resumes_without_new_records(bench_dir, capsys):
    out, argv = bench_dir
    before = (out / "results.jsonl").read_text()
    assert zoo_main(argv + SMALL_DATA) == 0
    assert (out / "results.jsonl").read_text() == before
    assert "already in results.jsonl, skipped" in capsys.readouterr().err


def test_ckpt_on_the_export_reproduces_the_trained_evaluation(bench_dir):
    out, _ = bench_dir
    export = out / "runs" / "tiny-s0-steps2" / "export"
    argv = ["bench", "--ckpt", str(export), "--limit", "3", "--max_new_tokens", "6", "--out", str(out)]
    assert zoo_main(argv + SMALL_DATA) == 0
    records = read(out / "results.jsonl")
    tiny, ckpt = records[1], records[-1]
    assert ckpt["method"] == "ckpt:tiny-s0-steps2" and len(records) == 3
    assert ckpt["metrics"]["nll"] == pytest.approx(tiny["metrics"]["nll"], rel=1e-6)
    assert ckpt["metrics"]["nll_tokens"] == tiny["metrics"]["nll_tokens"]
    completions = [r["completion"] for r in read(out / "runs" / "ckpt-tiny-s0-steps2" / "completions.jsonl")]
    trained = read(out / "runs" / "tiny-s0-steps2" / "completions.jsonl")
    assert completions == [r["completion"] for r in trained]


def test_missing_config_is_one_line_and_nonzero(tmp_path, capsys):
    assert zoo_main(["bench", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.yaml" in err[0] and err[0].startswith("zoo: error:")


def test_ckpt_without_an_export_is_a_clear_error(tmp_path, capsys):
    assert zoo_main(["bench", "--ckpt", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "holds no export" in capsys.readouterr().err


def test_data_overrides_keep_only_data_options_with_their_values():
    from zoo.harness.bench import data_overrides

    given = ["--trainer.max_epochs", "3", "--data.init_args.num_test", "4", "--data.init_args.seed=2",
             "--trainer.enable_progress_bar=false", "--data", "x.yaml"]
    assert data_overrides(given) == ["--data.init_args.num_test", "4", "--data.init_args.seed=2",
                                     "--data", "x.yaml"]


def test_peak_rss_is_reset_between_runs():
    from zoo.harness import bench

    ballast = bytearray(256 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page so it is resident
    high = bench.peak_rss_mb()
    del ballast
    if not bench.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs on this platform")
    assert bench.peak_rss_mb() < high - 200


def test_bench_reports_preference_metrics_on_pair_data(tmp_path):
    argv = ["bench", TINY, "--max_steps", "1", "--limit", "2", "--max_new_tokens", "4",
            "--out", str(tmp_path), "--", "--data", "zoo.datamodules.preference.PreferenceDataModule",
            "--data.init_args.dataset", "chain_sum", "--data.init_args.num_train", "8",
            "--data.init_args.num_val", "2", "--data.init_args.num_test", "4",
            "--data.init_args.batch_size", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]
    assert zoo_main(argv) == 0
    records = read(tmp_path / "results.jsonl")
    assert [r["method"] for r in records] == ["base", "tiny"]
    for record in records:
        metrics = record["metrics"]
        # rows that cannot be perturbed drop
        assert 0 < metrics["pairs"] <= 4 and 0.0 <= metrics["reward_accuracy"] <= 1.0
        assert metrics["logp_accuracy"] == metrics["reward_accuracy"]  # plain SFT modules: reward = log-prob
    assert "reward_accuracy" in (tmp_path / "results.md").read_text()


def test_a_failing_config_does_not_stop_the_sweep(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text(Path(TINY).read_text().replace("lr: 1.0e-3", "lr: 1.0e-3\n    no_such_option: 1"))
    argv = ["bench", str(broken), TINY, "--max_steps", "1", "--limit", "1", "--max_new_tokens", "2",
            "--no-base", "--out", str(tmp_path / "out"), *SMALL_DATA]
    assert zoo_main(argv) == 1
    # the good run still ran
    assert [r["method"] for r in read(tmp_path / "out" / "results.jsonl")] == ["tiny"]
    assert "1 of 2 runs failed" in capsys.readouterr().err


def test_the_same_data_through_different_config_files_has_one_identity(tmp_path):
    from zoo.harness.bench import build_cli, data_block

    nested = tmp_path / "nested" / "deeper"
    nested.mkdir(parents=True)
    (tmp_path / "data.yaml").write_text(
        "class_path: zoo.datamodules.SFTDataModule\ninit_args:\n  dataset: chain_sum\n  num_test: 4\n")
    for folder, link in ((tmp_path, "data.yaml"), (nested, "../../data.yaml")):
        (folder / "method.yaml").write_text(
            "model:\n  class_path: zoo.modules.CausalLMModule\n  init_args:\n    model: tiny-llama\n"
            f"data: {link}\n")
    a, b = (data_block(build_cli(["--config", str(folder / "method.yaml")])) for folder in (tmp_path, nested))
    assert a == b and a["init_args"]["num_test"] == 4


def test_limit_zero_skips_generation_and_keeps_the_nll(tmp_path):
    argv = ["bench", TINY, "--max_steps", "1", "--limit", "0", "--no-base", "--out", str(tmp_path),
            *SMALL_DATA]
    assert zoo_main(argv) == 0
    (record,) = read(tmp_path / "results.jsonl")
    assert record["eval_examples"] == 0 and "exact_match" not in record["metrics"]
    assert record["metrics"]["nll"] > 0 and record["metrics"]["nll_tokens"] > 0

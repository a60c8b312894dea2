"""``python -m zoo``: subcommands, ``list``, argument errors (exit 2), user errors (exit 1, one line), run
dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoo import registry
from zoo.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "smoke" / "tiny.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--data.init_args.num_train", "16", "--data.init_args.num_val", "4",
         "--data.init_args.num_test", "4"]


@pytest.fixture(autouse=True)
def _own_cwd(tmp_path, monkeypatch):
    """Runs land in tmp_path/runs; the launcher's run-dir variable never leaks between tests."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ZOO_RUN_DIR", raising=False)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: zoo")
    for command in ("fit", "validate", "test", "predict", "bench", "list"):
        assert command in out.split("subcommands:")[-1], command


def test_list_prints_every_registered_method(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    methods = registry.methods()
    assert len(lines) == len(methods) + 2  # header + rule
    assert lines[0].split() == ["name", "kind", "spec", "config", "paper"]
    names = [line.split()[0] for line in lines[2:]]
    assert names == [m.name for m in methods]
    assert {"sft", "lora"} <= set(names)
    sft_line = lines[2 + names.index("sft")]
    assert "configs/sft.yaml" in sft_line and "module" in sft_line


def test_list_markdown_is_the_registry_table(capsys):
    assert main(["list", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == registry.markdown_table().strip()


def test_unknown_config_key_exits_2_with_the_key(capsys):
    assert main(["fit", "--config", TINY, "--model.init_args.not_a_knob", "1"]) == 2
    err = capsys.readouterr().err
    assert "not_a_knob" in err


def test_wrong_type_exits_2_naming_the_field(capsys):
    assert main(["fit", "--config", TINY, "--model.init_args.lr", "fast"]) == 2
    err = capsys.readouterr().err
    assert "lr" in err and "fast" in err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("zoo: error:")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    return lines[0]


def test_missing_data_file_exits_1_with_one_line(capsys, tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert main(["fit", "--config", TINY, *QUIET, "--data.init_args.dataset", str(missing)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert str(missing) in line and "does not exist" in line


def test_malformed_row_exits_1_naming_file_and_row(capsys, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(4))
                    + json.dumps({"question": "q4"}) + "\n")
    code = main(["fit", "--config", TINY, *QUIET, "--data.init_args.dataset", str(data),
                 "--data.init_args.fields", '{"prompt": "question", "response": "answer"}',
                 "--data.init_args.num_val", "1", "--data.init_args.num_test", "1"])
    assert code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "bad.jsonl: row 5" in line and "'answer'" in line


def test_unknown_offline_model_exits_1_with_one_line(capsys):
    assert main(["fit", "--config", TINY, *QUIET, "--model.init_args.model", "zoo-tests/no-such-model"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "zoo-tests/no-such-model" in line and "HF_HUB_OFFLINE=1" in line


def test_error_exit_code_through_the_real_entry_point(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ZOO_RUN_DIR"}
    result = subprocess.run([sys.executable, "-m", "zoo", "fit", "--config", TINY, *QUIET,
                             "--data.init_args.dataset", str(tmp_path / "missing.csv")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("zoo: error: data file")


def test_each_run_gets_its_own_run_dir(tmp_path):
    args = ["fit", "--config", TINY, *QUIET, "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1"]
    assert main(args) == 0
    assert main(args) == 0  # in the same process: a second, separate run dir
    runs = sorted(p for p in (tmp_path / "runs" / "tiny").iterdir() if p.is_dir())
    assert len(runs) == 2
    for run in runs:
        assert (run / "config.yaml").exists()
        assert "train/loss" in (run / "metrics.csv").read_text().splitlines()[0]
        assert json.loads((run / "run.json").read_text())["state"] == "finished"
        assert not list((run / "checkpoints").glob("*.ckpt"))  # removed once exported (--keep_checkpoints)
        export = run / "export"
        assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()


def test_validate_test_and_predict_subcommands(tmp_path):
    """test logs test/loss and test/ppl (not val/...); predict writes one completion per prompt."""
    common = ["--config", TINY, *QUIET]
    assert main(["test", *common, "--trainer.default_root_dir", str(tmp_path / "t")]) == 0
    header = (tmp_path / "t" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "test/loss" in header and "test/ppl" in header and "val/loss" not in header
    assert main(["validate", *common, "--trainer.default_root_dir", str(tmp_path / "v")]) == 0
    assert "val/loss" in (tmp_path / "v" / "metrics.csv").read_text().splitlines()[0]
    assert main(["predict", *common, "--trainer.default_root_dir", str(tmp_path / "p"),
                 "--trainer.limit_predict_batches", "1", "--data.init_args.eval_batch_size", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["completion"], str) and r["prompt"] for r in rows)

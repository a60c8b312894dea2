"""Every built-in task's splits are disjoint (by prompt text) and exactly the requested sizes (issue 13
item 3); gsm_symbolic's template-held-out split shares no template (and no 13-gram) with training."""

from __future__ import annotations

import pytest

from zoo import tasks
from zoo.errors import ConfigError

SIZES = {"train": 60, "val": 32, "test": 64}
TINY = "tiny-llama"


def prompts(records: dict[str, list[dict]]) -> dict[str, list[str]]:
    return {split: [r["prompt"] for r in rows] for split, rows in records.items()}


def assert_disjoint(texts: dict[str, list[str]]) -> None:
    for split, rows in texts.items():
        assert len(rows) == len(set(rows)), f"{split} repeats a prompt"
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(texts[a]) & set(texts[b]), f"{a} and {b} share prompts"


@pytest.mark.parametrize("task", ["chain_sum", "gsm_symbolic", "basic_arithmetic"])
def test_reasoning_gym_splits_are_disjoint_and_exactly_sized(task):
    texts = prompts(tasks.task_splits(task, SIZES, seed=0))
    assert {split: len(rows) for split, rows in texts.items()} == SIZES
    assert_disjoint(texts)


def test_chain_sum_validation_keeps_its_size():
    """The old seed + 1 / seed + 2 streams overlapped item for item: validation collapsed to one problem."""
    splits = tasks.task_splits("chain_sum", {"train": 10, "val": 32, "test": 64}, seed=0)
    assert len(splits["val"]) == 32
    # test is still the historical stream (reasoning-gym's own seed + 2 data set): committed test items hold
    import reasoning_gym

    reference = [e["question"] for e in reasoning_gym.create_dataset("chain_sum", size=64, seed=2)]
    assert [r["prompt"] for r in splits["test"]] == reference


def test_test_split_depends_on_its_own_size_only():
    alone = tasks.task_splits("chain_sum", {"test": 16}, seed=0)["test"]
    together = tasks.task_splits("chain_sum", {"train": 40, "val": 8, "test": 16}, seed=0)["test"]
    assert [r["prompt"] for r in alone] == [r["prompt"] for r in together]


def test_sft_datamodule_splits_through_load_records():
    from zoo.datamodules import SFTDataModule

    data = SFTDataModule(dataset="chain_sum", tokenizer=TINY, num_train=50, num_val=20,
                         num_test=30)
    texts = prompts(data.load_records())
    assert {s: len(r) for s, r in texts.items()} == {"train": 50, "val": 20, "test": 30}
    assert_disjoint(texts)


def test_template_held_out_gsm_symbolic_shares_no_template_and_no_13_gram_with_train():
    from zoo.harness.checklist.contamination import contamination

    sizes = {"train": 120, "val": 8, "test": 24}
    held = tasks.task_splits("gsm_symbolic", sizes, seed=0, holdout="template")
    assert {s: len(r) for s, r in held.items()} == sizes
    assert_disjoint(prompts(held))
    templates = {split: {r["template"] for r in rows} for split, rows in held.items()}
    assert not templates["train"] & (templates["test"] | templates["val"])
    assert not templates["val"] & templates["test"]
    assert len(templates["test"]) >= 8  # many held-out templates, not one
    # independent of the template ids: word 13-grams of held-out prompts never occur in training prompts,
    # while with item hold-out (new numbers, trained templates) nearly every test prompt shares one
    item = tasks.task_splits("gsm_symbolic", sizes, seed=0)
    for splits, expect_none in ((held, True), (item, False)):
        rows = contamination({"train": [r["prompt"] for r in splits["train"]]},
                             {"test": [r["prompt"] for r in splits["test"]]}, n=13)
        if expect_none:
            assert rows[0]["flagged"] == 0
        else:
            assert rows[0]["flagged"] >= 12


def test_template_holdout_needs_gsm_symbolic():
    with pytest.raises(ConfigError, match="gsm_symbolic"):
        tasks.task_splits("chain_sum", SIZES, holdout="template")


def test_a_task_too_small_for_the_sizes_is_a_config_error():
    def stream(split):
        return iter([{"prompt": "same"}] * 5)

    with pytest.raises(ConfigError, match="val"):
        tasks.disjoint_splits({"test": 1, "val": 1}, stream, what="tiny")


def test_topics_and_tool_use_splits():
    from zoo.datamodules.classification import ClassificationDataModule
    from zoo.datamodules.tool_use import ToolUseDataModule

    for data in (ClassificationDataModule(dataset="topics", tokenizer=TINY, num_train=120,
                                          num_val=32, num_test=64),
                 ToolUseDataModule(tokenizer=TINY, num_train=120, num_val=32, num_test=64)):
        texts = prompts(data.load_records())
        assert {s: len(r) for s, r in texts.items()} == {"train": 120, "val": 32, "test": 64}
        assert_disjoint(texts)


@pytest.mark.parametrize("name", ["sentiment_hard", "science_topics", "sectors"])
def test_fewshot_task_splits(name):
    from zoo.datamodules import fewshot_tasks

    sizes = {"train": 60, "val": 16, "test": 32, "unlabeled": 16}
    texts = {s: [r["text"] for r in rows] for s, rows in fewshot_tasks.fewshot_splits(name, sizes).items()}
    assert {s: len(r) for s, r in texts.items()} == sizes
    assert_disjoint(texts)


def test_code_translation_preference_and_rag_splits():
    from zoo.datamodules.code import CodeDataModule
    from zoo.datamodules.preference import PreferenceDataModule
    from zoo.datamodules.translation import TranslationDataModule
    from zoo.harness.rag.corpus import build_country_corpus

    code = prompts(CodeDataModule(tokenizer=TINY, num_train=40, num_val=8,
                                  num_test=10).load_records())
    assert {s: len(r) for s, r in code.items()} == {"train": 40, "val": 8, "test": 10}
    assert_disjoint(code)
    translation = TranslationDataModule(tokenizer=TINY, num_train=60, num_val=16, num_test=32)
    records = translation.load_records()
    assert {s: len(r) for s, r in records.items()} == {"train": 60, "val": 16, "test": 32}
    assert_disjoint(prompts(records))
    pairs = PreferenceDataModule(dataset="chain_sum", tokenizer=TINY, num_train=30, num_val=8,
                                 num_test=16).load_records()
    assert_disjoint(prompts(pairs))  # pairs drop unperturbable problems: sizes are at most the asked ones
    assert all(0 < len(pairs[s]) <= n for s, n in (("train", 30), ("val", 8), ("test", 16)))
    corpus = build_country_corpus()
    assert not {q.question for q in corpus.pool} & {q.question for q in corpus.test}
    # knowledge editing is exempt by design: its val / test ARE the edits it trains (EditingDataModule)

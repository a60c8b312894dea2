"""Thinking-then-translating data (spec 33): golden target formats, segments, length guard, extraction,
metrics, the built-in pycountry set, local and hub-shaped loading."""

from __future__ import annotations

import gettext
import json
from pathlib import Path

import pycountry
import pytest
import torch

from zoo.datamodules import SEGMENT_ANSWER, SEGMENT_PROMPT, SEGMENT_REASONING, DataError
from zoo.datamodules.translation import (
    TranslationDataModule,
    best_translation,
    build_target,
    builtin_pairs,
    corpus_scores,
    extract_translation,
)
from zoo.errors import ConfigError
from zoo.kernels.selected_ce import IGNORE_INDEX

X, R, Y = "The cat sleeps.", "cat -> Katze\nsleeps -> schläft", "Die Katze schläft."
CANDIDATES = ["Die Katze schlaeft.", "Katze schläft."]


def stub_qe(source: str, candidate: str) -> float:  # longer is better; ties possible by length
    return float(len(candidate))


def test_the_four_formats_are_byte_exact():
    golden_cot = "<think>\ncat -> Katze\nsleeps -> schläft\n</think>\n\nFinal Translation\n"
    assert build_target("ioft", X, Y, R, CANDIDATES, stub_qe) == ("", "Die Katze schläft.")
    assert build_target("cotft", X, Y, R, CANDIDATES, stub_qe) == (golden_cot, "Die Katze schläft.")
    # "Die Katze schlaeft." is one character longer than y: the stub scorer prefers it
    assert build_target("ioft_max", X, Y, R, CANDIDATES, stub_qe) == ("", "Die Katze schlaeft.")
    assert build_target("cotft_max", X, Y, R, CANDIDATES, stub_qe) == (golden_cot, "Die Katze schlaeft.")
    with pytest.raises(ConfigError, match="target_format"):
        build_target("cot", X, Y, R, CANDIDATES, stub_qe)


def test_max_keeps_the_reference_on_ties_and_without_a_scorer():
    assert best_translation(X, "abcd", ["wxyz", "ab"], stub_qe) == "abcd"  # tie with "wxyz": y stays
    assert best_translation(X, "abcd", ["abcde"], None) == "abcd"
    assert best_translation(X, "ab", ["abcde", "abc"], stub_qe) == "abcde"


@pytest.mark.parametrize("fmt", ["ioft", "cotft", "ioft_max", "cotft_max"])
def test_segments_cover_exactly_the_target_formats(tmp_path, fmt):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"en": X, "de": Y, "r": R, "cands": "\n".join(CANDIDATES)}) + "\n")
    data = TranslationDataModule(dataset=str(path), tokenizer="tiny-llama", target_format=fmt, num_val=0,
                                 num_test=0, fields={"source": "en", "target": "de", "trace": "r",
                                                     "candidates": "cands"}, qe="copy_penalty")
    data.setup("fit")
    row = data.encoded["train"].rows[0]
    ids, seg, labels = (torch.tensor(row[k]) for k in ("input_ids", "segments", "labels"))
    tok = data.tokenizer
    # copy_penalty: "Die Katze schlaeft." and y share no word with x; the y-only tie keeps y
    thinking = "<think>\n" + R + "\n</think>\n\nFinal Translation\n" if fmt.startswith("cotft") else ""
    assert tok.decode(ids[seg == SEGMENT_REASONING]) == thinking
    assert tok.decode(ids[seg == SEGMENT_ANSWER]) == Y + tok.eos_token
    prompt = "Translate the following text from English into German.\n\n" + X
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
    assert tok.decode(ids[seg == SEGMENT_PROMPT]) == rendered
    assert torch.equal(labels == IGNORE_INDEX, seg == SEGMENT_PROMPT)  # the loss covers the whole target


def test_per_segment_loss_split_sums_to_the_total():
    from zoo import backbone

    data = TranslationDataModule(tokenizer="tiny-llama", target_format="cotft", num_train=4, num_val=0,
                                 num_test=0, batch_size=4, max_length=1024)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    model, _ = backbone.tiny_llama()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                             reduction="none")
    seg = batch["segments"][:, 1:]
    parts = {s: loss[seg == s].sum() for s in (SEGMENT_REASONING, SEGMENT_ANSWER)}
    assert parts[SEGMENT_REASONING] > 0 and parts[SEGMENT_ANSWER] > 0
    torch.testing.assert_close(parts[SEGMENT_REASONING] + parts[SEGMENT_ANSWER], loss.sum())


def test_overlong_targets_are_dropped_never_cut():
    full = TranslationDataModule(tokenizer="tiny-llama", target_format="cotft", num_val=0, num_test=0,
                                 max_length=4096)
    full.setup("fit")
    lengths = [len(r["input_ids"]) for r in full.encoded["train"].rows]
    limit = sorted(lengths)[len(lengths) // 2]
    guarded = TranslationDataModule(tokenizer="tiny-llama", target_format="cotft", num_val=0, num_test=0,
                                    max_length=limit)
    guarded.setup("fit")
    assert guarded.stats["train_dropped"] == sum(n > limit for n in lengths)
    for row in guarded.encoded["train"].rows:
        text = guarded.tokenizer.decode(row["input_ids"])
        assert "\nFinal Translation\n" in text and text.endswith(guarded.tokenizer.eos_token)


def test_extractor_round_trips():
    assert extract_translation("<think>\nx\n</think>\n\nFinal Translation\nDie Katze.") == "Die Katze."
    assert extract_translation("Final Translation\nA\nFinal Translation\nB ") == "B"
    assert extract_translation("<think>draft</think> Die Katze.") == "Die Katze."
    assert extract_translation("  Die Katze.\n") == "Die Katze."


def test_bleu_of_identical_strings_is_100_and_chrf_is_bounded():
    scores = corpus_scores(["Die Katze schläft auf dem Sofa."], ["Die Katze schläft auf dem Sofa."])
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    disjoint = corpus_scores(["xyz qrs tuv wxy"], ["Die Katze schläft auf dem Sofa."])
    assert disjoint["bleu"] == pytest.approx(0.0) and 0.0 <= disjoint["chrf"] < 10.0


def test_builtin_set_translates_names_and_splits_by_name():
    catalog = gettext.translation("iso3166-1", pycountry.LOCALES_DIR, languages=["de"])
    translated = [c.name for c in pycountry.countries if catalog.gettext(c.name) != c.name]
    rows = builtin_pairs("de")
    assert len(rows) == 4 * len(translated)
    germany = next(r for r in rows if r["name"] == "Germany")
    assert germany["source"] == "The name of this country is Germany."
    assert germany["target"] == "Der Name dieses Landes ist Deutschland."
    data = TranslationDataModule(tokenizer="tiny-llama", target_format="ioft", num_val=8, num_test=12,
                                 max_length=1024)
    data.setup("fit")
    names = {split: {r["source"].rsplit(" ", 1)[-1] for r in data.records[split]} for split in data.records}
    assert len(data.records["test"]) == 12 and len(data.records["val"]) == 8
    by_source = {r["source"]: r["name"] for r in rows}
    name_sets = {s: {by_source[r["source"]] for r in data.records[s]} for s in data.records}
    assert not (name_sets["train"] & name_sets["test"]) and not (name_sets["train"] & name_sets["val"])
    assert names["test"]
    with pytest.raises(ConfigError, match="frames"):
        builtin_pairs("xh")


def test_cot_format_needs_a_trace_column(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"source": X, "target": Y}) + "\n")
    with pytest.raises(DataError, match="trace"):
        TranslationDataModule(dataset=str(path), tokenizer="tiny-llama", target_format="cotft", num_val=0,
                              num_test=0).setup("fit")
    io = TranslationDataModule(dataset=str(path), tokenizer="tiny-llama", target_format="ioft", num_val=0,
                               num_test=0)
    io.setup("fit")
    assert io.records["train"][0]["response"] == Y


def test_hub_shaped_folder_loads_through_datasets(tmp_path: Path):
    folder = tmp_path / "topxgen-like"
    folder.mkdir()
    rows = [{"source": f"Sentence {i}.", "target": f"Das ist der Satz Nummer {i}.", "trace": f"{i} -> {i}"}
            for i in range(6)]
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    data = TranslationDataModule(dataset=str(folder), tokenizer="tiny-llama", target_format="cotft",
                                 splits={"train": "train", "test": "test"}, num_val=0, num_test=2)
    data.setup("fit")
    assert [r["reference"] for r in data.records["test"]] == ["Das ist der Satz Nummer 4.",
                                                             "Das ist der Satz Nummer 5."]
    assert data.records["train"][3]["response"].endswith("Final Translation\nDas ist der Satz Nummer 3.")
    outputs = ["x\nFinal Translation\nDas ist der Satz Nummer 4.", "Das ist der Satz Nummer 5."]
    metrics = data.evaluation_metrics(data.records["test"], outputs)
    assert metrics["bleu"] == pytest.approx(100.0)


def test_config_fast_dev_run_on_tiny_backbone_with_the_builtin_set(tmp_path, monkeypatch):
    from zoo.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ZOO_RUN_DIR", raising=False)
    config = Path(__file__).resolve().parents[2] / "configs" / "cot_translation.yaml"
    assert main(["fit", "--config", str(config), "--model.init_args.model", "tiny-llama",
                 "--data.init_args.max_length", "1024", "--data.init_args.batch_size", "2",
                 "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu",
                 "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]) == 0

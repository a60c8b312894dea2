"""``PreferenceDataModule``: (prompt, chosen, rejected) pairs for DPO-style objectives.

Sources (``dataset``)
    * a built-in task name (:mod:`zoo.tasks`, e.g. ``chain_sum``, ``gsm_symbolic``): chosen = the
      task's worked solution, rejected = :func:`perturb_solution` of it (one intermediate result
      changed by a small delta and the final ``#### N`` answer moved by the same delta, so it is
      scored wrong). Deterministic: the perturbation is seeded by ``seed`` and the row index.
    * a local file (``.json`` list, ``.jsonl``, ``.parquet``, ``.csv``);
    * a hub data set id or a local data-set folder, read with ``datasets.load_dataset``.
    ``fields`` maps the zoo's ``prompt`` / ``chosen`` / ``rejected`` (/ ``answer``) to the source's
    columns. A chosen/rejected value that is a chat (a list of ``{role, content}``) is reduced to its
    last message's content.

Batches are ONE concatenated SFT-style batch of ``2B`` rows, so the shared
``CausalLMModule.training_step`` (one forward, token selectors, ``compute_loss``) runs unchanged:
rows ``[0, B)`` are the chosen responses, rows ``[B, 2B)`` the rejected ones of the same pairs, all
right-padded to one width. Keys: ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt and
padding, built by :func:`zoo.datamodules.sft.encode_example`), ``segments``, ``index`` (the pair's
row index, repeated for both halves) and ``is_chosen`` (2B,) bool. :func:`split_pairs` splits any
(2B, ...) tensor back into (chosen, rejected).

Harness hooks, as on ``SFTDataModule``: :meth:`eval_records`, :meth:`score_completion` (final answer
exact match against the chosen side's answer), :meth:`evaluation_metrics`; plus
:func:`preference_metrics` (reward accuracy / margin of a module on held-out pairs, and the
chosen-only response NLL as ``nll`` with a ``rejected_nll`` column), which the bench calls as
``data.preference_metrics(module, split="test")``.
"""

from __future__ import annotations

import functools
import math
import random
import re
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from zoo import tasks
from zoo.datamodules.sft import (
    DataError,
    EncodedDataset,
    SFTDataModule,
    collate,
    encode_example,
    extract_final_answer,
    fit_length,
)
from zoo.labels import target_mask

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")
_RESULT = re.compile(r"(?<==\s)-?\d+(?:\.\d+)?|(?<==)-?\d+(?:\.\d+)?")


def perturb_solution(response: str, seed: int) -> str | None:
    """A deterministic wrong version of a worked solution ending in ``#### N``; None if impossible.

    One intermediate number (a result after ``=`` if any, else any number before ``####``) is moved
    by ``delta`` in {-9..-1, 1..9} and the final answer by the same ``delta``.
    """
    body, marker, final = response.rpartition("####")
    if not marker:
        return None
    answer = final.strip()
    try:
        value = float(answer.replace(",", ""))
    except ValueError:
        return None
    rng = random.Random(seed)
    delta = rng.choice([d for d in range(-9, 10) if d != 0])
    candidates = list(_RESULT.finditer(body)) or list(_NUMBER.finditer(body))
    if candidates:
        match = rng.choice(candidates)
        old = match.group(0)
        new = _format_number(float(old) + delta, old)
        body = body[: match.start()] + new + body[match.end():]
    wrong = _format_number(value + delta, answer)
    return f"{body}#### {wrong}"


def _format_number(value: float, like: str) -> str:
    return str(int(value)) if "." not in like and value == int(value) else f"{value:g}"


def split_pairs(tensor: Tensor) -> tuple[Tensor, Tensor]:
    """(2B, ...) -> chosen (B, ...), rejected (B, ...)."""
    half = tensor.shape[0] // 2
    return tensor[:half], tensor[half:]


def collate_pairs(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """Chosen rows then rejected rows, right-padded to one common width (see the module docstring)."""
    flat = ([dict(r["chosen"], index=r["index"]) for r in rows]
            + [dict(r["rejected"], index=r["index"]) for r in rows])
    batch = collate(flat, pad_id)
    batch["is_chosen"] = torch.arange(len(flat)) < len(rows)
    return batch


def _text(value: Any) -> Any:
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return value[-1].get("content")
    return value


class PreferenceDataModule(SFTDataModule):
    """(prompt, chosen, rejected) pairs as concatenated 2B-row batches (chosen first)."""

    def __init__(
        self,
        dataset: str = "chain_sum",
        tokenizer: str = "smollm2-135m",
        fields: dict[str, str] | None = None,
        hub_config: str | None = None,
        splits: dict[str, str] | None = None,
        num_train: int = 512,
        num_val: int = 32,
        num_test: int = 64,
        max_length: int = 384,
        overlong: Literal["truncate", "drop"] = "truncate",
        on_malformed: Literal["error", "skip"] = "error",
        system_prompt: str | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        """
        Args:
            dataset: a built-in task (pairs built by perturbing its worked solution), a local
                .json/.jsonl/.parquet/.csv file, or a hub data set id / local data-set folder.
            tokenizer: the backbone whose tokenizer renders the data (linked to ``model.init_args.model``).
            fields: source columns for ``prompt``, ``chosen``, ``rejected`` and optionally ``answer``.
            hub_config: config name of a hub data set.
            splits: split names (hub) or files (local) for train / val / test; missing held-out splits are
                carved from the end of train.
            num_train: training pairs (built-in tasks: problems generated).
            num_val: held-out pairs for validation.
            num_test: held-out pairs for the harness.
            max_length: longest rendered row (prompt + response), in tokens; longer responses are truncated.
            overlong: ``truncate`` the response tail, or ``drop`` the pair.
            on_malformed: ``error`` on a missing/empty field, or ``skip`` the row and count it.
            system_prompt: optional system message in the chat template.
            batch_size: training pairs per micro-batch (the batch holds 2x rows).
            eval_batch_size: validation / test pairs per batch.
            num_workers: DataLoader workers.
            seed: seed of the built-in generators and the perturbation.
            shuffle_seed: seed of the training order; None = the run's global seed (as SFTDataModule).
        """
        super().__init__(dataset=dataset, tokenizer=tokenizer, fields=fields, hub_config=hub_config,
                         splits=splits, num_train=num_train, num_val=num_val, num_test=num_test,
                         max_length=max_length,
                         overlong=overlong, on_malformed=on_malformed, system_prompt=system_prompt,
                         batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         seed=seed, shuffle_seed=shuffle_seed)
        self.fields = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "answer": "answer",
                       **(fields or {})}

    # ------------------------------------------------------------------ loading
    # Loading and splitting are SFTDataModule's (files, hub, built-in tasks, held-out carving); pairs only
    # change how a row becomes a record.
    def task_records(self, records: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        return self._pairs_from_task(records, split)

    def map_rows(self, rows, origin: str) -> list[dict[str, Any]]:
        return self._map_pair_fields(rows, origin)

    def _pairs_from_task(self, records: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        out, skipped = [], 0
        offset = tasks.SPLIT_SEED_OFFSET[split] * 1_000_003
        for number, record in enumerate(records):
            rejected = None
            for attempt in range(4):  # a delta that lands on a still-correct answer is retried
                candidate = perturb_solution(record["response"],
                                             seed=self.hparams.seed + offset + 7919 * number
                                             + attempt)
                if candidate is not None and not tasks.score_answer(record, extract_final_answer(candidate)):
                    rejected = candidate
                    break
            if rejected is None:
                skipped += 1
                continue
            out.append({**record, "chosen": record["response"], "rejected": rejected})
        if skipped:
            self.stats[f"{split}_unperturbable"] = skipped
        return out

    def _map_pair_fields(self, rows, origin: str) -> list[dict[str, Any]]:
        out, skipped = [], 0
        for number, row in enumerate(rows, start=1):
            values = {key: _text(row.get(self.fields[key])) for key in ("prompt", "chosen", "rejected")}
            problem = next((k for k, v in values.items() if not isinstance(v, str) or not v.strip()), None)
            if problem is not None:
                if self.hparams.on_malformed == "skip":
                    skipped += 1
                    continue
                raise DataError(f"{origin}: row {number}: field {self.fields[problem]!r} ({problem}) is "
                                "missing or empty; map the right column with "
                                f"`fields: {{{problem}: ...}}` or set on_malformed: skip")
            answer = row.get(self.fields["answer"])
            values["answer"] = str(answer) if answer is not None else extract_final_answer(values["chosen"])
            values["response"] = values["chosen"]
            out.append(values)
        if skipped:
            self.stats[f"skipped_malformed:{origin}"] = skipped
        return out

    # ------------------------------------------------------------------ encoding
    def _encode_side(self, prompt: str, response: str) -> dict[str, list[int]] | None:
        row = encode_example(self.tokenizer, prompt, response, self.hparams.system_prompt)
        return fit_length(row, self.hparams.max_length, self.hparams.overlong)

    def encode_split(self, records: list[dict[str, Any]], split: str) -> EncodedDataset:
        rows, dropped = [], 0
        for index, record in enumerate(records):
            chosen = self._encode_side(record["prompt"], record["chosen"])
            rejected = self._encode_side(record["prompt"], record["rejected"])
            if chosen is None or rejected is None or chosen["input_ids"] == rejected["input_ids"]:
                dropped += 1  # too long, or identical after truncation (no preference signal left)
                continue
            rows.append({"chosen": chosen, "rejected": rejected, "index": index})
        self.stats[f"{split}_dropped"] = dropped
        if not rows:
            raise DataError(f"no {split} pairs left after encoding ({dropped} over max_length="
                            f"{self.hparams.max_length}); raise max_length or check the source")
        return EncodedDataset(rows)

    # ------------------------------------------------------------------ loaders
    def collate_function(self):
        return collate_pairs

    def side_dataloader(self, side: Literal["chosen", "rejected"], split: str = "train",
                        shuffle: bool = True) -> DataLoader:
        """Plain SFT batches of one side (e.g. to fine-tune cDPO's positive / negative models)."""
        self.setup("fit")
        rows = [dict(r[side], index=r["index"]) for r in self.encoded[split].rows]
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(EncodedDataset(rows), batch_size=self.hparams.batch_size, shuffle=shuffle,
                          generator=generator if shuffle else None,
                          collate_fn=functools.partial(collate, pad_id=self.tokenizer.pad_token_id))

    # ------------------------------------------------------------------ harness hooks
    def preference_metrics(self, module, split: str = "test") -> dict[str, float]:
        """Reward accuracy / margin and chosen / rejected NLL of ``module`` on held-out pairs (see
        :func:`preference_metrics`)."""
        self.setup("test")
        return preference_metrics(module, self._loader(split, shuffle=False))


@torch.no_grad()
def preference_metrics(module, loader) -> dict[str, float]:
    """Reward accuracy and margin, and per-side response NLL, of a module on preference batches.

    The reward of a response is ``module.sequence_rewards(batch, outputs)`` when the module defines it (DPO:
    ``beta * (log pi - log pi_ref)`` summed over the response), else its summed response log-prob
    (an SFT model: ``log p(chosen) - log p(rejected)``). ``reward_accuracy`` is the fraction of pairs
    with a strictly larger chosen reward; ``reward_margin`` the mean chosen - rejected reward.
    ``logp_accuracy`` / ``logp_margin`` are the same on the policy's own summed log-probs, comparable
    across every module (for a module without ``sequence_rewards`` they equal the reward ones).
    ``nll`` (with ``ppl`` and ``nll_tokens``) is the token-mean NLL of the CHOSEN responses only, the
    held-out NLL of the answers the model should give (pooling in the rejected side, which a preference
    objective pushes down on purpose, would mix two opposite goals); ``rejected_nll`` is the same on the
    rejected responses.
    """
    was_training = module.training
    module.eval()
    reward_diffs, logp_diffs = [], []
    nll_sums, nll_counts = [0.0, 0.0], [0, 0]  # chosen, rejected
    try:
        for batch in loader:
            batch = {k: v.to(module.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            outputs = module(batch)
            mask = target_mask(batch["labels"]).float()
            token_nll = module.weighted_token_loss(outputs, mask)
            logps = -token_nll.sum(1)
            rewards = (module.sequence_rewards(batch, outputs) if hasattr(module, "sequence_rewards")
                       else logps)
            for diffs, values in ((reward_diffs, rewards), (logp_diffs, logps)):
                chosen, rejected = split_pairs(values.float())
                diffs.append(chosen - rejected)
            for side, (nll, side_mask) in enumerate(zip(split_pairs(token_nll), split_pairs(mask))):
                nll_sums[side] += float(nll.double().sum())
                nll_counts[side] += int(side_mask.sum())
    finally:
        module.train(was_training)
    reward_t, logp_t = torch.cat(reward_diffs), torch.cat(logp_diffs)
    chosen_nll, rejected_nll = (total / max(count, 1) for total, count in zip(nll_sums, nll_counts))
    return {"reward_accuracy": float((reward_t > 0).float().mean()), "reward_margin": float(reward_t.mean()),
            "logp_accuracy": float((logp_t > 0).float().mean()), "logp_margin": float(logp_t.mean()),
            "pairs": float(reward_t.numel()), "nll": chosen_nll, "ppl": math.exp(min(chosen_nll, 50.0)),
            "nll_tokens": nll_counts[0], "rejected_nll": rejected_nll}

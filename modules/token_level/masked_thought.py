"""Masked Thought (MFT): corrupt a fraction of the response input tokens, keep the original labels.

Paper: Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical Reasoning
Learning of Language Models (2024). Spec: papers/18-masked-thought.md. Official code:
ChangyuChen347/MaskedThought.

Implements
    * the batch transform (:func:`corrupt_tokens`): in ``on_train_batch_start`` every response
      input position (``labels != -100``, EOS included; or only the reasoning segment with
      ``positions="reasoning"``) is replaced independently with probability ``rate_t``; labels,
      segments, prompt and padding are never touched, and nothing happens outside training;
    * ``corruption="mask_token"`` (the paper): a ``<mask>`` special token is added to the tokenizer and
      the embeddings are resized in ``setup``; the new input row (and the output row when the head is
      untied) is the mean of the pre-existing rows;
    * ``corruption="random_token"`` (the GSM8K script of the official code): a uniform id from an
      explicit range ``[random_low, random_high)``; ``random_high=None`` means ``tokenizer.vocab_size``
      (the base vocabulary, which excludes added special tokens and embedding padding rows);
    * the rate warm-up ``rate_t = max_rate * min(1, t / (warmup_ratio * T))`` with ``t =
      trainer.global_step`` (optimizer steps) and ``T = trainer.estimated_stepping_batches``: a
      resumed run restores the rate because there is no private counter;
    * the optional ``drop_attention`` variant (masked positions are also hidden from attention).

Differs from the official code
    * the warm-up counts optimizer steps, not collate calls per process (the MetaMath/MAmmoTH scripts);
    * corruption is drawn per position (independent coin flips), not Binomial count + positions without
      replacement: the same distribution, as the spec notes;
    * the random draws use a generator seeded from ``(seed, global_step, batch_idx, global_rank)``, so
      a run is reproducible and DDP ranks corrupt differently.

Not implemented: the alternative decaying schedules behind the MAmmoTH script's env flags.
With ``mask_token`` the vocabulary gains one class, so even at rate 0 the loss is not bit-identical
to plain SFT on the original vocabulary (``random_token`` at rate 0 is).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from zoo.datamodules.sft import SEGMENT_REASONING
from zoo.errors import check_range
from zoo.kernels.selected_ce import IGNORE_INDEX
from zoo.registry import register_method

MASK_TOKEN = "<mask>"


def mask_rate(step: int, total_steps: int, max_rate: float, warmup_ratio: float) -> float:
    """``max_rate * min(1, step / (warmup_ratio * total_steps))``; no warm-up when the ratio is 0."""
    warmup = warmup_ratio * max(1, total_steps)
    if warmup <= 0:
        return max_rate
    return max_rate * min(1.0, step / warmup)


def corruptible_positions(batch: dict[str, Tensor], positions: Literal["response", "reasoning"]) -> Tensor:
    """(B, T) bool: the input positions MFT may corrupt (never prompt, never padding)."""
    valid = batch["attention_mask"].bool() & (batch["labels"] != IGNORE_INDEX)
    if positions == "reasoning":
        valid = valid & (batch["segments"] == SEGMENT_REASONING)
    return valid


def corrupt_tokens(
    input_ids: Tensor,
    allowed: Tensor,
    rate: float,
    corruption: Literal["mask_token", "random_token"],
    generator: torch.Generator,
    mask_id: int | None = None,
    id_range: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Replace each ``allowed`` position of ``input_ids`` (B, T) with probability ``rate``.

    Returns the corrupted ids (a new tensor) and the (B, T) bool mask of replaced positions.
    ``mask_token`` writes ``mask_id``; ``random_token`` draws uniformly from ``[id_range[0], id_range[1])``.
    """
    draws = torch.rand(input_ids.shape, generator=generator, device=generator.device).to(input_ids.device)
    replaced = allowed & (draws < rate)
    if corruption == "mask_token":
        if mask_id is None:
            raise ValueError("mask_token corruption needs mask_id")
        fill = torch.full_like(input_ids, mask_id)
    elif corruption == "random_token":
        if id_range is None:
            raise ValueError("random_token corruption needs id_range")
        fill = torch.randint(id_range[0], id_range[1], input_ids.shape, generator=generator,
                             device=generator.device).to(input_ids.device)
    else:
        raise ValueError(f"unknown corruption {corruption!r}; use mask_token or random_token")
    return torch.where(replaced, fill, input_ids), replaced


def add_mask_token(model: torch.nn.Module, tokenizer, token: str = MASK_TOKEN) -> int:
    """Add ``token`` as a special token and resize the embeddings; its row = mean of the existing rows.

    The input row is set, and the output row too when the LM head is untied (tied: one shared row).
    Idempotent: a token already in the vocabulary is only looked up. Returns its id.
    """
    if token in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(token)
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    new_id = tokenizer.convert_tokens_to_ids(token)
    rows = model.get_input_embeddings().weight.shape[0]
    existing = min(rows, new_id)  # the rows of real tokens before this one
    tied = model.get_output_embeddings() is None or (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    in_mean = model.get_input_embeddings().weight.detach()[:existing].float().mean(0)
    out_mean = None if tied else model.get_output_embeddings().weight.detach()[:existing].float().mean(0)
    if new_id >= rows:
        model.resize_token_embeddings(new_id + 1, mean_resizing=False)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[new_id] = in_mean.to(weight.dtype)
        if out_mean is not None:
            head = model.get_output_embeddings().weight
            head[new_id] = out_mean.to(head.dtype)
    return new_id


@register_method(
    name="masked_thought",
    paper="Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical Reasoning "
          "Learning of Language Models (2024)",
    spec="18",
)
class MaskedThoughtCallback(Callback):
    """Masked Thought: corrupt response input tokens during training (labels unchanged)."""

    def __init__(
        self,
        max_rate: float = 0.4,
        warmup_ratio: float = 0.66,
        corruption: Literal["mask_token", "random_token"] = "mask_token",
        positions: Literal["response", "reasoning"] = "response",
        random_low: int = 0,
        random_high: int | None = None,
        drop_attention: bool = False,
        seed: int = 0,
    ) -> None:
        """
        Args:
            max_rate: final corruption probability of a response input token (0.4 GSM8K Llama-2; 0.2
                MetaMath).
            warmup_ratio: fraction of the planned optimizer steps over which the rate ramps 0 -> max_rate
                (0.66).
            corruption: ``mask_token`` (paper: an added ``<mask>`` token) or ``random_token`` (official GSM8K
                script).
            positions: ``response`` (every supervised input position incl. EOS, as the spec) or ``reasoning``
                only.
            random_low: random_token mode: lowest id drawn (inclusive).
            random_high: random_token mode: highest id drawn (exclusive); None = ``tokenizer.vocab_size``.
            drop_attention: also hide corrupted positions from attention (optional variant, off in the paper).
            seed: seed of the corruption draws (combined with step, batch index and rank).
        """
        super().__init__()
        check_range("MaskedThoughtCallback max_rate", max_rate, 0.0, 1.0, "the paper uses 0.4 (GSM8K) or 0.2")
        check_range("MaskedThoughtCallback warmup_ratio", warmup_ratio, 0.0, 1.0, "the paper uses 0.66")
        self.max_rate, self.warmup_ratio = max_rate, warmup_ratio
        self.corruption, self.positions = corruption, positions
        self.random_low, self.random_high = random_low, random_high
        self.drop_attention, self.seed = drop_attention, seed
        self.mask_id: int | None = None
        self.id_range: tuple[int, int] | None = None
        self.last_rate = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        tokenizer = pl_module.tokenizer
        if self.corruption == "mask_token":
            self.mask_id = add_mask_token(pl_module.model, tokenizer)
        else:
            high = tokenizer.vocab_size if self.random_high is None else self.random_high
            rows = pl_module.model.get_input_embeddings().weight.shape[0]
            if not 0 <= self.random_low < high <= rows:
                raise ValueError(f"random token range [{self.random_low}, {high}) must lie inside the "
                                 f"embedding matrix [0, {rows})")
            self.id_range = (self.random_low, high)

    def rate(self, trainer: L.Trainer) -> float:
        """The corruption rate at the trainer's current optimizer step."""
        total = int(trainer.estimated_stepping_batches)
        return mask_rate(trainer.global_step, total if math.isfinite(total) else 1, self.max_rate,
                         self.warmup_ratio)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        rate = self.rate(trainer)
        self.last_rate = rate
        pl_module.log("mft/rate", rate)
        if rate <= 0.0:
            return
        input_ids = batch["input_ids"]
        generator = torch.Generator(device="cpu").manual_seed(
            hash((self.seed, trainer.global_step, batch_idx, trainer.global_rank)) % (2**63)
        )
        corrupted, replaced = corrupt_tokens(input_ids, corruptible_positions(batch, self.positions), rate,
                                             self.corruption, generator, self.mask_id, self.id_range)
        batch["clean_input_ids"] = input_ids
        batch["input_ids"] = corrupted
        if self.drop_attention:
            batch["attention_mask"] = batch["attention_mask"] * (~replaced).to(batch["attention_mask"].dtype)

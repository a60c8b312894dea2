"""An lm-evaluation-harness ``LM`` around a live zoo module (any adapter, any method), no export needed.

    import lm_eval
    from lm_eval.tasks import TaskManager
    from zoo.harness.lm_eval_model import ZooLM

    lm = ZooLM(zoo.load("RUN"))          # or a module in memory, e.g. right after trainer.fit
    results = lm_eval.simple_evaluate(model=lm, tasks=["zoo_chain_sum"],
                                      task_manager=TaskManager(include_path="lm_eval_tasks/"))

``generate_until`` goes through the module's ``generate_text`` (:mod:`zoo.decoding`, the adapter's
decoding hooks): the request's context is the user message and the zoo renders it with the chat template,
as ``zoo bench`` does, so do **not** pass ``apply_chat_template`` (the context would be rendered twice).
``until`` strings become the decoder's stop strings, ``max_gen_toks`` its ``max_new_tokens``; greedy unless
``do_sample``. ``loglikelihood`` / ``loglikelihood_rolling`` score raw text (no chat template) through the
module's ``forward`` and its LM head, so prompt-tuning and other adapters are measured as they train.
Tokenisation follows lm-eval's ``HFLM`` (context / continuation split of the joint encoding, the
tokenizer's BOS-or-EOS as the prefix of an empty context), so scores compare with ``--model hf``.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM

__all__ = ["ZooLM"]


class ZooLM(LM):
    """lm-eval model for a zoo module (``CausalLMModule`` or subclass): ``batch_size`` rows per forward or
    decoding batch; ``max_length``: longer inputs keep their last ``max_length`` tokens."""

    def __init__(self, module, batch_size: int = 8, max_length: int = 2048) -> None:
        super().__init__()
        self.module, self.batch_size, self.max_length = module, int(batch_size), int(max_length)
        self.tokenizer = module.tokenizer

    # ------------------------------------------------------------------ tokenisation (as lm-eval's HFLM)
    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix_token_id], self._encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self._encode(context + continuation), self._encode(context)
        return head, whole[len(head):]

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per pair."""
        from zoo.modules.base import target_mask

        module = self.module
        device = next(module.parameters()).device
        was_training = module.training
        module.eval()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_token_id
        results: list[tuple[float, bool]] = []
        try:
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start:start + self.batch_size]
                rows = [(context + continuation)[-self.max_length:] for context, continuation in chunk]
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                labels = torch.full((len(rows), width), -100, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for i, (row, (_, continuation)) in enumerate(zip(rows, chunk)):
                    ids[i, :len(row)] = torch.tensor(row)
                    mask[i, :len(row)] = 1
                    labels[i, len(row) - len(continuation):len(row)] = torch.tensor(continuation)
                batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                         "labels": labels.to(device)}
                outputs = module(batch)
                weights = target_mask(batch["labels"]).float()
                nll = module.weighted_token_loss(outputs, weights).double().sum(dim=1)
                weight, bias = module.lm_head_weight()
                logits = outputs.hidden[:, :-1] @ weight.T + (bias if bias is not None else 0)
                greedy = logits.argmax(-1)
                for i, (row, (_, continuation)) in enumerate(zip(rows, chunk)):
                    span = slice(len(row) - len(continuation) - 1, len(row) - 1)
                    is_greedy = bool((greedy[i, span].cpu() == torch.tensor(continuation)).all())
                    results.append((-float(nll[i]), is_greedy))
        finally:
            module.train(was_training)
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._encode_pair(*request.args) for request in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of each whole string after the prefix token (one window of ``max_length``)."""
        pairs = [([self.prefix_token_id], self._encode(request.args[0])) for request in requests]
        return [score for score, _ in self._score(pairs)]

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        for indices in groups.values():
            kwargs: dict[str, Any] = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = int(kwargs.pop("max_gen_toks", 256))
            sampling = {key: kwargs[key] for key in ("do_sample", "temperature", "top_p", "top_k")
                        if key in kwargs}
            if not sampling.get("do_sample"):
                sampling = {}
            texts = self.module.generate_text([requests[i].args[0] for i in indices],
                                              max_new_tokens=max_new_tokens, batch_size=self.batch_size,
                                              stop=until, **sampling)
            for i, text in zip(indices, texts):
                results[i] = text
        return [text or "" for text in results]

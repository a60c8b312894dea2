"""``BlackBoxClassifier``: label log-probabilities of prompt strings, nothing else (no weights, no gradients).

The interface the unsupervised black-box prompt learner (spec 24) and any API-style method program against: a
model that returns, for each full prompt text, the log-probability of every label (B, C), normalised over the
labels. :class:`LocalBlackBox` implements it over any zoo backbone (or a trained zoo classification module)
with the :class:`~zoo.modules.classification.verbalizer.Verbalizer`, inside ``torch.no_grad()`` and eval mode
(the previous mode restored), returning detached CPU tensors; ``queries`` counts the prompts scored (the API
budget of spec 24).

API:
    ``BlackBoxClassifier`` (Protocol): ``labels: list[str]``; ``label_logprobs(texts: list[str]) -> Tensor``
    (B, C) log-softmax over labels, no autograd graph.
    ``LocalBlackBox(model="smollm2-135m", labels=..., label_words=None, chat=True, batch_size=16)``: ``model``
    is a backbone name/path or an already loaded ``nn.Module`` (then pass ``tokenizer``); ``chat`` renders
    each text with the chat template (assistant turn open) like the classification data, else tokenizes
    it raw.
    ``LocalBlackBox.from_module(module)`` wraps a :class:`ClassificationModule` (its adapter and verbalizer).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from zoo import backbone
from zoo.chat import render_prompt_ids
from zoo.errors import ConfigError
from zoo.modules.adapters.base import Adapter
from zoo.modules.classification.verbalizer import Verbalizer, Words


@runtime_checkable
class BlackBoxClassifier(Protocol):
    """Label log-probabilities (B, C) of full prompt texts, without gradients."""

    labels: list[str]

    def label_logprobs(self, texts: list[str]) -> Tensor: ...


class LocalBlackBox:
    """A :class:`BlackBoxClassifier` over a local zoo backbone (see the module docstring)."""

    def __init__(self, model: str | nn.Module = backbone.SMOLLM2, labels: list[str] | None = None,
                 label_words: Words | None = None, tokenizer: Any = None, chat: bool = True,
                 batch_size: int = 16, verbalizer: Verbalizer | None = None,
                 hidden_fn: Any = None) -> None:
        if isinstance(model, str):
            model, tokenizer = backbone.load(model)
        if tokenizer is None:
            raise ConfigError("LocalBlackBox over a loaded model needs its tokenizer: pass tokenizer=...")
        self.model, self.tokenizer, self.chat, self.batch_size = model, tokenizer, chat, batch_size
        if verbalizer is None:
            verbalizer = Verbalizer(list(labels or []), label_words).bind(tokenizer, model.config.hidden_size)
        self.verbalizer = verbalizer
        self.labels = list(verbalizer.labels)
        if hidden_fn is None:
            adapter = Adapter()
            adapter.bind(model, tokenizer)
            hidden_fn = adapter.hidden_states
        self.hidden_fn = hidden_fn
        self.queries = 0

    @classmethod
    def from_module(cls, module: Any, batch_size: int = 16) -> LocalBlackBox:
        """Wrap a trained :class:`~zoo.modules.classification.module.ClassificationModule`."""
        return cls(module, tokenizer=module.tokenizer, verbalizer=module.verbalizer, batch_size=batch_size,
                   hidden_fn=module.forward_hidden)

    def _ids(self, text: str) -> list[int]:
        if self.chat:
            return render_prompt_ids(self.tokenizer, text, None)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def label_logprobs(self, texts: list[str]) -> Tensor:
        """(B, C) log-softmax over labels of each text's label scores; no graph, eval mode, CPU."""
        was_training = self.model.training
        self.model.eval()
        head = self.model.get_output_embeddings()
        lm_head = (head.weight, getattr(head, "bias", None))
        try:
            with torch.no_grad():
                rows = [self._ids(t) for t in texts]
                scores = [self.verbalizer.score(self.hidden_fn, lm_head, rows[i: i + self.batch_size],
                                                self.tokenizer.pad_token_id)
                          for i in range(0, len(rows), self.batch_size)]
                out = torch.cat(scores).log_softmax(-1).detach().float().cpu()
        finally:
            self.model.train(was_training)
        self.queries += len(texts)
        return out

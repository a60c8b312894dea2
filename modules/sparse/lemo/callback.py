"""``LeMoSparseStrategy``: the YAML entry point that installs LeMo on the model and drives it per batch.

In ``setup`` it wraps the attention of every sparse layer (:class:`TokenEliminationAttention`) and, with
``mlp.drop_ratio`` > 0, its MLP (:class:`ChannelSparseMLP`); per batch it hands the wrappers the token
mask, logs the kept-token fraction and, with ``selection.scorer: predictor``, trains the predictors
online on oracle targets (:class:`PredictorTrainer`) until they take over the selection. Predictors and
their step count are saved in the checkpoint. Why a Callback and not a Lightning ``Strategy``: see the
package docstring (:mod:`zoo.modules.sparse.lemo`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from zoo import backbone
from zoo.errors import ConfigError
from zoo.modules.sparse.lemo.attention import LeMoContext, TokenEliminationAttention
from zoo.modules.sparse.lemo.mlp import ChannelSparseMLP
from zoo.modules.sparse.lemo.options import (
    ElasticOptions,
    KernelOptions,
    MLPOptions,
    PredictorOptions,
    SelectionOptions,
)
from zoo.modules.sparse.lemo.predictor import PredictorTrainer
from zoo.modules.sparse.lemo.scores import layer_keep_fractions


class LeMoSparseStrategy(Callback):
    """LeMo token elimination (and optional MLP channel sparsity) installed on the model in ``setup``.

    Composes with any Lightning strategy (single device, ddp, ModelParallelStrategy / FSDP2) and any
    CausalLMModule (full fine-tuning, PeftModule/LoRA): see the package docstring for why it is a Callback."""

    def __init__(
        self,
        selection: SelectionOptions = SelectionOptions(),
        predictor: PredictorOptions = PredictorOptions(),
        elastic: ElasticOptions = ElasticOptions(),
        mlp: MLPOptions = MLPOptions(),
        kernel: KernelOptions = KernelOptions(),
    ) -> None:
        """
        Args:
            selection: which token blocks each layer keeps: block size, keep schedule, scorer, causal fix.
            predictor: the Q/K block-pattern predictors and their online training (scorer: predictor).
            elastic: elastic shrinking of the predictors' hidden neurons.
            mlp: saved-activation channel sparsity of the SwiGLU MLP (drop_ratio rho; 0 = off).
            kernel: block-score and gather/scatter implementation (auto = Triton on CUDA).
        """
        super().__init__()
        self.selection, self.predictor, self.elastic = selection, predictor, elastic
        self.mlp, self.kernel = mlp, kernel
        self.context = LeMoContext(eval_sparse=selection.sparse_eval)
        self.predictor_trainer = PredictorTrainer(predictor, elastic)
        self.wrappers: list[TokenEliminationAttention] = []
        self.fractions: list[float] = []
        self._pending_state: dict[str, Any] | None = None
        self._batch_counter = 0

    @property
    def predictors(self) -> nn.ModuleDict:
        """Layer index (str) -> :class:`BlockPatternPredictor` (empty unless scorer is ``predictor``)."""
        return self.predictor_trainer.predictors

    # ------------------------------------------------------------------ model transform
    def apply(self, model: nn.Module) -> list[TokenEliminationAttention]:
        """Wrap the attention (and, with mlp.drop_ratio, the MLP) of every sparse layer of ``model``."""
        sel = self.selection
        layers = backbone.decoder_layers(model)
        self.fractions = layer_keep_fractions(len(layers), sel.schedule, sel.keep_ratio, sel.start_layer,
                                              sel.dense_last, sel.keep_fractions)
        self.wrappers = []
        for idx, (layer, fraction) in enumerate(zip(layers, self.fractions)):
            attention = getattr(layer, "self_attn", None)
            if attention is None:
                raise ConfigError(f"LeMo needs Llama-style decoder layers with .self_attn; "
                                  f"got {type(layer).__name__}")
            if isinstance(attention, TokenEliminationAttention):
                self.wrappers.append(attention)
                continue
            if fraction >= 1.0:
                continue
            predictor = None
            if sel.scorer == "predictor":
                predictor = self.predictor_trainer.predictor_for(idx, attention.head_dim, sel.block_size)
            wrapper = TokenEliminationAttention(attention, idx, fraction, sel.block_size, self.context,
                                                sel.causal_fix, sel.oracle_rope, predictor,
                                                self.kernel.backend)
            layer.self_attn = wrapper
            self.wrappers.append(wrapper)
            if self.mlp.drop_ratio > 0 and not isinstance(layer.mlp, ChannelSparseMLP):
                layer.mlp = ChannelSparseMLP(layer.mlp, self.mlp.drop_ratio)
        return self.wrappers

    def remove(self, model: nn.Module) -> None:
        """Undo :meth:`apply` (the dense model again; parameters are shared, nothing is copied)."""
        for layer in backbone.decoder_layers(model):
            if isinstance(layer.self_attn, TokenEliminationAttention):
                layer.self_attn = layer.self_attn.inner
            if isinstance(getattr(layer, "mlp", None), ChannelSparseMLP):
                layer.mlp = layer.mlp.inner
        self.wrappers = []

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.apply(pl_module.model)
        if self._pending_state is not None:
            self.predictor_trainer.load_predictors(self._pending_state)
            self._pending_state = None

    def _predictors_select(self) -> bool:
        return self.selection.scorer == "predictor" and self.predictor_trainer.trained

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.predictors.to(pl_module.device)
        self.context.use_predictors = self._predictors_select()

    def _begin_batch(self, batch: dict[str, Tensor]) -> None:
        self._batch_counter += 1
        self.context.batch_id = self._batch_counter
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        self.context.token_mask = mask.bool() if mask is not None else None
        self.context.captured.clear()
        self.context.processed.clear()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.predictors.to(pl_module.device)
        self._begin_batch(batch)
        self.context.capture = (self.selection.scorer == "predictor"
                                and self.predictor_trainer.wants_step(trainer.global_step))
        self.context.use_predictors = self._predictors_select()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.predictors.to(pl_module.device)
        self._begin_batch(batch)
        self.context.capture = False

    on_test_batch_start = on_validation_batch_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        processed = self.context.processed
        if processed:
            kept = sum(k for k, _ in processed.values()) / sum(t for _, t in processed.values())
            pl_module.log("lemo/kept_token_fraction", kept, batch_size=1)
        if self.context.capture and self.context.captured:
            loss, recall = self.predictor_update(self.context.captured)
            pl_module.log("lemo/predictor_loss", loss, batch_size=1)
            pl_module.log("lemo/predictor_recall", recall, batch_size=1)
        self.context.captured.clear()
        self.context.capture = False

    # ------------------------------------------------------------------ predictor training
    def predictor_update(self, captured: dict[int, tuple[Tensor, Tensor]]) -> tuple[float, float]:
        """One predictor step on captured (attention input, oracle target) pairs; the LLM stays frozen.

        Returns (mean loss, mean top-k recall vs the oracle)."""
        return self.predictor_trainer.update(captured, self.fractions)

    def train_predictors(self, model: nn.Module, batches: Iterable[dict[str, Tensor]],
                         steps: int) -> list[float]:
        """Offline predictor training (artifact ``predictor_trainer.py``): frozen LLM, ``steps`` batches.

        ``model`` must already be wrapped by :meth:`apply`. Returns the recall after each step."""
        recalls, was_training = [], model.training
        model.train()
        iterator = iter(batches)
        for _ in range(steps):
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(batches)
                batch = next(iterator)
            self._begin_batch(batch)
            self.context.capture, self.context.use_predictors = True, False
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      use_cache=False, logits_to_keep=1)
            recalls.append(self.predictor_update(dict(self.context.captured))[1])
            self.context.captured.clear()
        self.context.capture = False
        self.context.batch_id = None
        model.train(was_training)
        return recalls

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return self.predictor_trainer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.predictor_trainer.step = int(state_dict.get("predictor_step", 0))
        if self.wrappers:
            self.predictor_trainer.load_predictors(state_dict)
            self._pending_state = None
        else:
            self._pending_state = state_dict

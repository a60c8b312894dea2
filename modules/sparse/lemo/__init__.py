"""LeMo / JENGA: layer-wise token elimination in the attention sublayer for long-context fine-tuning.

Paper: LeMo: Enabling LEss Token Involvement for MOre Context Fine-tuning (2025), published as JENGA:
Enhancing Long-Context Fine-tuning of LLMs with Contextual Token Sparsity (USENIX ATC 2025).
Spec: papers/01-lemo.md (checked against the JENGA text and the authors' artifact ``Pairshoe/Jenga-AE``).

Layout (read in this order)
    ``options.py``    the typed option blocks the YAML sets (selection, predictor, elastic, mlp, kernel)
    ``scores.py``     block scores, causal fix, per-layer keep schedules, top-k selection (pure functions)
    ``predictor.py``  the Q/K block-pattern predictors and their trainer (own AdamW, elastic shrinking)
    ``attention.py``  the attention wrapper that runs only the kept blocks at their original positions
    ``mlp.py``        saved-activation channel sparsity of the SwiGLU MLP
    ``callback.py``   :class:`LeMoSparseStrategy`, the Callback users name in YAML
    q/k with RoPE are recomputed by the shared :func:`zoo.modules.qk.query_key_states`.

Implements
    * Block scores (Eq. 1-2): pre-softmax Q.K, positive part, summed over heads / N_head, max inside each
      ``block x block`` tile, column sums; causal bias handled by ``causal_fix`` (``symmetrize`` = the
      artifact's ``A + triu(A^T, 1)`` on the block matrix, ``count_norm`` = divide by the number of causal
      query blocks, ``none``). Blockwise, never the full T x T matrix (:mod:`zoo.kernels.lemo_scores`).
    * Per-layer keep fractions: ``artifact_e2e`` (dense before ``start_layer`` and the last layer,
      ``keep_ratio`` = 0.4 in between), ``profiled`` (the artifact's Llama2-7B per-layer elimination profile,
      interpolated over depth), ``constant`` and explicit ``keep_fractions``.
    * Elimination in the attention sublayer only: the kept blocks (``floor(k_l * n_b)``, top-k, sorted) go
      through q/k/v, RoPE at their ORIGINAL positions, attention and o_proj, and are scatter-added into a
      zero tensor, so an eliminated token's attention output is 0 and the residual carries it unchanged; the
      MLP sees every token. Per-row indices (the artifact scatters into batch row 0 only). Kept blocks are
      cached per batch so gradient-checkpoint recomputation reuses them.
    * Optional saved-activation channel sparsity of the SwiGLU MLP (``mlp.drop_ratio`` = rho): exact
      forward, backward only through the top ``1 - rho`` intermediate channels.
    * Pattern predictors (Eq. 3): per layer a Q and a K MLP (64*d_h -> 128 -> 64*d_h -> d_h, ReLU, shared
      across heads); target = per-block max of sum_heads ReLU(QK^T) (pre-RoPE, unmasked, / 16), SmoothL1 (or
      MSE), AdamW (0.9, 0.95), 20 warm-up steps then constant; optional elastic shrinking (tau 0.8 then
      -0.05 per round). Recall vs the oracle is logged.

Why a Callback and not a Lightning ``Strategy`` subclass
    LeMo changes the model, not how it is distributed. A Callback that wraps the attention modules in
    ``setup`` runs before ``configure_model`` (FSDP2 sharding) and before DDP wrapping, so the same class
    composes with single-device, ``ddp`` and ``ModelParallelStrategy`` runs, with LoRA or full fine-tuning,
    without one Strategy subclass per base strategy. The wrappers re-register the wrapped module's children
    under their original names, so state-dict keys, peft adapter names, checkpoints and the export are
    unchanged (the export is the plain HF model).

Differs from the official code
    * Default ``selection.scorer: oracle`` (exact block scores from the layer's own q/k projections under
      no_grad); the paper uses the trained predictors at fine-tuning time (``scorer: predictor``). Predictors
      train online on the first ``predictor.steps`` fine-tuning batches (oracle selection meanwhile; the
      artifact trains them offline for 400 steps first) or offline through
      :meth:`LeMoSparseStrategy.train_predictors`.
    * The scatter-add lands in a zero tensor and the decoder layer adds the residual (the artifact fuses the
      residual add in place); the LM head + loss run only on labelled rows in chunks through the shared
      ``zoo.kernels.selected_ce`` (the artifact's segment loss).
    * Channel sparsity is applied to the same layers as token elimination and needs a plain ``nn.Linear``
      ``down_proj`` (LoRA on q/k/v/o, the artifact's setting, or full fine-tuning).
    * On backbones with fewer than 4 layers ``artifact_e2e`` does not keep the last layer dense, so smoke
      runs on the 2-layer tiny model exercise elimination.

Not implemented
    Algorithm 1's finite-difference threshold search (its eps, eta and accuracy signal are not stated; the
    profiled ratios are shipped instead), the fused in-place residual kernel, 2D sparsity, sparsity-aware
    offload, non-Llama-style attention (GPT-2 style modules are rejected with a clear error), and eager /
    sdpa are the only attention implementations supported when some kept tokens are padding.
"""

from zoo.modules.sparse.lemo.attention import LeMoContext, TokenEliminationAttention, compact_attention_mask
from zoo.modules.sparse.lemo.callback import LeMoSparseStrategy
from zoo.modules.sparse.lemo.mlp import ChannelSparseMLP, channel_scores
from zoo.modules.sparse.lemo.options import (
    CausalFix,
    ElasticOptions,
    KernelOptions,
    MLPOptions,
    PredictorOptions,
    Schedule,
    SelectionOptions,
)
from zoo.modules.sparse.lemo.predictor import BlockPatternPredictor, PredictorTrainer
from zoo.modules.sparse.lemo.scores import (
    PROFILED_ELIMINATION_LLAMA2,
    apply_causal_fix,
    column_scores,
    kept_block_count,
    layer_keep_fractions,
    oracle_block_scores,
    select_blocks,
    topk_recall,
)
from zoo.registry import register

__all__ = [
    "PROFILED_ELIMINATION_LLAMA2", "BlockPatternPredictor", "CausalFix", "ChannelSparseMLP",
    "ElasticOptions", "KernelOptions", "LeMoContext", "LeMoSparseStrategy", "MLPOptions",
    "PredictorOptions", "PredictorTrainer", "Schedule", "SelectionOptions", "TokenEliminationAttention",
    "apply_causal_fix", "channel_scores", "column_scores", "compact_attention_mask", "kept_block_count",
    "layer_keep_fractions", "oracle_block_scores", "select_blocks", "topk_recall",
]

register(
    name="lemo",
    kind="strategy",
    paper="LeMo: Enabling LEss Token Involvement for MOre Context Fine-tuning (2025) / JENGA (ATC 2025)",
    spec="01",
    config="configs/lemo.yaml",
    target="zoo.modules.sparse.lemo:LeMoSparseStrategy",
    scope="no Algorithm-1 threshold search (profiled ratios shipped), no fused in-place residual kernel, "
          "no 2D sparsity / offload; predictors train online or offline",
)

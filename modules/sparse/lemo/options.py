"""LeMo's settings, grouped by the mechanism they drive (one typed block per mechanism).

``LeMoSparseStrategy(selection=..., predictor=..., elastic=..., mlp=..., kernel=...)`` takes one of
each; in YAML they are nested dicts under ``init_args`` (jsonargparse builds the dataclasses)::

    init_args:
      selection: {block_size: 64, schedule: artifact_e2e, keep_ratio: 0.4, scorer: oracle}
      predictor: {steps: 400, lr: 2.0e-5}
      mlp: {drop_ratio: 0.8}

Omitted blocks and fields keep the paper's / artifact's defaults given below. Spec: papers/01-lemo.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from zoo.errors import ConfigError

CausalFix = Literal["symmetrize", "none", "count_norm"]
Schedule = Literal["artifact_e2e", "profiled", "constant"]


@dataclass(frozen=True)
class SelectionOptions:
    """Which token blocks each layer's attention keeps (paper §4.2, Eq. 1-2, Algorithm 1).

    Args:
        block_size: tokens per block b (paper 64; 8-16 on tiny models).
        schedule: per-layer keep fractions: ``artifact_e2e`` (dense early layers and last layer, keep_ratio
            after start_layer), ``profiled`` (artifact's Llama2 per-layer profile over depth), ``constant``.
        keep_ratio: kept block fraction k_l of sparse layers in artifact_e2e / constant (artifact 0.4).
        start_layer: first sparse layer (artifact_e2e default: round(15/32 * layers), i.e. 15 of 32).
        dense_last: keep the last layer dense in artifact_e2e (backbones with >= 4 layers).
        keep_fractions: explicit k_l per layer (overrides schedule), e.g. ratios from your own profiling.
        causal_fix: causal-bias handling of oracle scores: symmetrize (artifact), none, count_norm.
        oracle_rope: apply RoPE to q/k before oracle scoring (the artifact's target is pre-RoPE).
        scorer: ``oracle`` (exact block scores under no_grad) or ``predictor`` (paper: trained Q/K
            predictors, see the predictor block).
        sparse_eval: also eliminate tokens in validation/test forwards (default: dense evaluation).
    """

    block_size: int = 64
    schedule: Schedule = "artifact_e2e"
    keep_ratio: float = 0.4
    start_layer: int | None = None
    dense_last: bool = True
    keep_fractions: list[float] | None = None
    causal_fix: CausalFix = "symmetrize"
    oracle_rope: bool = False
    scorer: Literal["oracle", "predictor"] = "oracle"
    sparse_eval: bool = False

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"selection.block_size must be >= 1, got {self.block_size}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"selection.keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.keep_fractions is not None and not all(0.0 < f <= 1.0 for f in self.keep_fractions):
            raise ConfigError(f"selection.keep_fractions must lie in (0, 1], got {self.keep_fractions}")


@dataclass(frozen=True)
class PredictorOptions:
    """The per-layer Q/K block-pattern predictors and their training (paper §4.3; artifact
    ``predictor_trainer.py``). Used only with ``selection.scorer: predictor``.

    Args:
        hidden: width of the predictors' first hidden map (artifact 128).
        steps: fine-tuning steps during which predictors train on oracle targets (artifact 400).
        refresh_every: after that, one more predictor step every N steps (0 = never).
        lr: predictor AdamW learning rate (artifact 2e-5).
        warmup: linear warm-up steps of the predictor learning rate (artifact 20).
        loss: predictor regression loss (artifact SmoothL1; MSE option).
    """

    hidden: int = 128
    steps: int = 400
    refresh_every: int = 0
    lr: float = 2e-5
    warmup: int = 20
    loss: Literal["smooth_l1", "mse"] = "smooth_l1"

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.steps < 0 or self.refresh_every < 0 or self.warmup < 0:
            raise ConfigError("predictor.hidden must be >= 1 and predictor.steps / refresh_every / warmup "
                              f">= 0, got {self}")


@dataclass(frozen=True)
class ElasticOptions:
    """Elastic shrinking of the predictors (paper §4.3, Table 8): every ``every`` predictor steps up to
    ``until``, drop hidden neurons whose pre-ReLU output was <= 0 in >= tau of the samples.

    Args:
        enabled: shrink predictors elastically (drop mostly-inactive hidden neurons).
        every: predictor steps between shrinking rounds (artifact 100).
        until: last predictor step at which shrinking happens (artifact ~620).
        tau: first zero-frequency threshold tau (artifact 0.8).
        tau_step: tau decrease per round (artifact 0.05).
    """

    enabled: bool = False
    every: int = 100
    until: int = 620
    tau: float = 0.8
    tau_step: float = 0.05

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"elastic.every must be >= 1, got {self.every}")


@dataclass(frozen=True)
class MLPOptions:
    """Saved-activation channel sparsity of the SwiGLU MLP (paper §4.2 "extend to MLP"; artifact rho).

    Args:
        drop_ratio: rho, fraction of MLP channels whose saved activations are dropped (e2e Llama 0.8;
            0 = off).
    """

    drop_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_ratio <= 1.0:
            raise ConfigError(f"mlp.drop_ratio must be in [0, 1], got {self.drop_ratio}")


@dataclass(frozen=True)
class KernelOptions:
    """Which implementation computes block scores and gathers / scatters kept rows (:mod:`zoo.kernels`).

    Args:
        backend: auto (Triton on CUDA, PyTorch elsewhere), triton, torch.
    """

    backend: Literal["auto", "triton", "torch"] = "auto"

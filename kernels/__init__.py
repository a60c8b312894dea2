"""Kernels: each Triton kernel beside its PyTorch reference and a dispatcher."""

from zoo.kernels.selected_ce import selected_linear_cross_entropy

__all__ = ["selected_linear_cross_entropy"]

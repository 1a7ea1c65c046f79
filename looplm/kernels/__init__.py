"""Replacement linear layers for fast inference (prepacked bf16, int8, int4) and the one
place that swaps them into a model."""

from looplm.kernels.swap import LAYER_PROJECTIONS, is_layer_projection, replace_linears

__all__ = ["LAYER_PROJECTIONS", "is_layer_projection", "replace_linears"]

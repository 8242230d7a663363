"""Layers built on the MSDA op."""

from dilateformer.nn.attention import LAYOUTS, GlobalAttention, MultiScaleDilatedAttention

__all__ = ["MultiScaleDilatedAttention", "GlobalAttention", "LAYOUTS"]

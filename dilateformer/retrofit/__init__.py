"""Retrofit MSDA into pretrained plain ViTs: :func:`msda_vit` swaps the attention of chosen blocks, keeping weights."""

from dilateformer.retrofit.attention import PatchGrid, RetrofitAttention, window_attention_with_extra_keys
from dilateformer.retrofit.vit import DEFAULT_THRESHOLD, RetrofitReport, msda_vit, parse_blocks, retrofit_config

__all__ = [
    "DEFAULT_THRESHOLD",
    "PatchGrid",
    "RetrofitAttention",
    "RetrofitReport",
    "msda_vit",
    "parse_blocks",
    "retrofit_config",
    "window_attention_with_extra_keys",
]

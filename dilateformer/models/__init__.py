"""DilateFormer models: the timm-registered family, official-checkpoint conversion and detection backbones.

Importing this package registers ``dilateformer_{nano,tiny,small,base}`` and the ``_384`` variants with timm.
"""

from dilateformer.models.convert import (
    convert_official_checkpoint,
    load_checkpoint_file,
    load_into,
    load_weights,
    read_metadata,
    save_weights,
)
from dilateformer.models.dilateformer import (
    ATTN_TYPES,
    VARIANTS,
    DilateBlock,
    DilateFormer,
    DilateStage,
    checkpoint_filter_fn,
    create_dilateformer,
)
from dilateformer.models.factory import create_model, global_twin

__all__ = [
    "ATTN_TYPES",
    "VARIANTS",
    "DilateBlock",
    "DilateFormer",
    "DilateStage",
    "checkpoint_filter_fn",
    "convert_official_checkpoint",
    "create_dilateformer",
    "create_model",
    "global_twin",
    "load_checkpoint_file",
    "load_into",
    "load_weights",
    "read_metadata",
    "save_weights",
]

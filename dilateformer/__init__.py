"""dilateformer: Multi-Scale Dilated Attention and DilateFormer models."""

from dilateformer.functional import multi_scale_dilated_attention, use_backend

__version__ = "0.1.0"
__all__ = ["multi_scale_dilated_attention", "use_backend", "__version__"]
from dilateformer import models  # noqa: F401  (registers the timm models)

"""Weight-space encoders: training-free (sketch), baselines (rawcos, FlatVec …), learned (W2T, GL-net)."""
from lorasearch.encoders.base import DEFAULT_ENCODER, Encoder, available, get_encoder, l2_normalize, register

__all__ = ["DEFAULT_ENCODER", "Encoder", "available", "get_encoder", "l2_normalize", "register"]

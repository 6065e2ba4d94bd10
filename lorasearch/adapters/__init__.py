"""Readers for LoRA adapter files (PEFT, diffusers, kohya) and writers for tests and collections.

    from lorasearch.adapters import load_adapter, find_adapters, describe
    ad = load_adapter("my_lora.safetensors")      # -> LoraAdapter, modules with normalized names
"""
from .reader import adapter_sha256, describe, find_adapters, load_adapter, trigger_words

_WRITERS = ("FORMATS", "adapter_delta_error", "delta_error", "delta_weight", "module_specs", "random_adapter",
            "write_adapter")

__all__ = ["load_adapter", "find_adapters", "adapter_sha256", "describe", "trigger_words",
           "module_specs", "random_adapter", "write_adapter", "delta_weight", "delta_error",
           "adapter_delta_error", "FORMATS"]


def __getattr__(name: str):
    # The writers need torch (≈1–4 s to import); reading does not, so `lorasearch info`/`stats`
    # must not pay for it: load them on first use.
    if name in _WRITERS:
        from . import writers

        return getattr(writers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

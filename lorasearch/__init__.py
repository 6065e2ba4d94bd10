"""lorasearch: a search engine for LoRA adapters that reads the weights themselves."""
__version__ = "0.1.0"

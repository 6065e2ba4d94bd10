"""The vector store: a transactional SQLite catalog (source of truth) + per-family FAISS snapshots
(+ a search-only GPU copy). See ``store.py`` for the guarantees."""
from .gpu import gpu_count, resolve_device
from .base import Store, open_store
from .store import LoraIndex

__all__ = ["LoraIndex", "Store", "gpu_count", "open_store", "resolve_device"]

"""Which FAISS index a family's snapshot is: exact flat by default, or an index-factory type.

DESIGN decision 4: exact search up to ~1M adapters; a factory string (``"IVF1024,Flat"``,
``"HNSW32"``, ``"IVF4096,PQ32"``...) opts an index into approximate search beyond that. The
string is fixed when the index is created; everything here follows from it per family:

- **ids.** IVF types keep adapter ids natively, with a hash-table direct map so
  ``remove_ids`` and ``reconstruct(id)`` work (``IndexIDMap`` cannot wrap them: its
  ``remove_ids`` assumes the inner index compacts positions like a flat one, IVF does not).
  Every other type sits in an ``IndexIDMap2``, like the flat default.
- **training.** A type that needs training (IVF, PQ, ...) is trained on the family's own
  vectors from the catalog, but only once the family has ``min_train`` of them (39 points
  per centroid: below that FAISS itself warns the clustering is poor). Until then the family
  is served by an exact flat index ("fallback"); the writer upgrades it when it gets there.
- **removal.** Types without ``remove_ids`` (HNSW, NSG) are rebuilt from the catalog, which
  is the source of truth; the caller learns that from ``remove`` returning False.
- **search knobs.** ``nprobe`` (IVF) and ``efSearch`` (HNSW) are set per search through
  ``faiss.ParameterSpace``, which reaches through IDMap/PreTransform wrappers.
"""
from __future__ import annotations

import re

import faiss
import numpy as np

from lorasearch.errors import IncompatibleError, UsageError

FLAT = "Flat"
POINTS_PER_CENTROID = 39        # FAISS's clustering warns below 39 training points per centroid
SMALL_TRAIN_MIN = 1000         # scalar quantizers / PCA: statistics, not clusterings
DEFAULT_NPROBE = 32
DEFAULT_EF_SEARCH = 64
_PROBE_DIMS = (768, 960, 1000, 1024, 512, 384)   # dims tried when the real dim is not known yet


def _faiss_reason(e: Exception) -> str:
    text = " ".join(str(e).split())
    m = re.search(r"at \S+:\d+: (.*)", text)
    return (m.group(1) if m else text)[:200]


def normalize(factory: str | None) -> str:
    """``None``/``""``/``"flat"`` -> ``"Flat"``; other strings are stripped of spaces."""
    text = "".join((factory or "").split())
    if not text or text.lower() in ("flat", "idmap,flat", "idmap2,flat"):
        return FLAT
    if "idmap" in text.lower():
        raise UsageError(f"faiss factory {factory!r}: leave out IDMap, lorasearch maps adapter ids itself")
    return text


def _make(dim: int, factory: str):
    return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)


def validate(factory: str, dim: int | None = None) -> None:
    """Refuse a factory string FAISS cannot build for ``dim`` (or, dim unknown, for any common dim)."""
    if factory == FLAT:
        return
    errors = []
    for d in ((dim,) if dim else _PROBE_DIMS):
        try:
            _make(d, factory)
            return
        except RuntimeError as e:
            errors.append(_faiss_reason(e))
    where = f"dim {dim}" if dim else "any common dim"
    cls = IncompatibleError if dim else UsageError
    raise cls(f"faiss factory {factory!r} cannot be built for {where}: {errors[0]}")


def _pq_centroids(index) -> int:
    """Centroids per PQ sub-quantizer somewhere in ``index`` (0 if it has no PQ)."""
    node = faiss.downcast_index(index)
    if hasattr(node, "pq"):
        return 1 << int(node.pq.nbits)
    for inner in ("index", "storage"):      # IndexPreTransform / IndexHNSW* wrappers
        child = getattr(node, inner, None)
        if isinstance(child, faiss.Index):
            return _pq_centroids(child)
    return 0


def min_train(factory: str, dim: int) -> int:
    """Vectors a family needs before it gets the factory type (0: none needed, e.g. HNSW).

    39 points per centroid of every clustering the type trains (IVF lists, PQ codebooks);
    other trained parts (scalar quantizers, PCA) only estimate statistics: SMALL_TRAIN_MIN."""
    if factory == FLAT:
        return 0
    probe = _make(dim, factory)
    if probe.is_trained:
        return 0
    ivf = faiss.try_extract_index_ivf(probe)
    centroids = max(int(ivf.nlist) if ivf is not None else 0, _pq_centroids(probe))
    return POINTS_PER_CENTROID * centroids if centroids else SMALL_TRAIN_MIN


def build_flat(dim: int, ids: np.ndarray, vectors) -> faiss.IndexIDMap2:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def build(dim: int, ids: np.ndarray, vectors, factory: str = FLAT):
    """A fresh index for one family: ``factory`` (trained on ``vectors`` if it must be) or,
    when the family is too small to train it, the exact flat fallback."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if factory == FLAT or len(ids) < min_train(factory, dim):
        return build_flat(dim, ids, vectors)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    inner = _make(dim, factory)
    if not inner.is_trained:
        inner.train(vectors)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        index = inner
    else:
        index = faiss.IndexIDMap2(inner)
    if len(ids):
        index.add_with_ids(vectors, ids)
    return index


def is_flat(index) -> bool:
    """The plain ``IndexIDMap2(IndexFlatIP)`` (the default, or a fallback of a factory index)."""
    return isinstance(index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)


def is_fallback(index, factory: str) -> bool:
    return factory != FLAT and is_flat(index)


def _signature(index) -> tuple:
    """What identifies the factory's type in a built index: the class chain, code size, nlist."""
    parts = []
    node = index
    while node is not None:
        node = faiss.downcast_index(node)
        parts.append((type(node).__name__, int(node.d), int(getattr(node, "code_size", 0) or 0),
                      int(getattr(node, "nlist", 0) or 0), int(node.metric_type)))
        if isinstance(node, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
            node = node.index
        else:
            node = None
    return tuple(parts)


def matches(index, factory: str, dim: int) -> bool:
    """Is ``index`` what ``build`` makes for ``factory`` (either the factory type or the flat fallback)?"""
    if is_flat(index):
        return faiss.downcast_index(index.index).metric_type == faiss.METRIC_INNER_PRODUCT
    if factory == FLAT:
        return False
    fresh = _make(dim, factory)
    expected = _signature(fresh if faiss.try_extract_index_ivf(fresh) is not None else faiss.IndexIDMap2(fresh))
    return _signature(index) == expected


def ids_of(index) -> np.ndarray:
    """All adapter ids an index holds (unsorted)."""
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    out = []
    for list_no in range(ivf.nlist):
        n = lists.list_size(list_no)
        if n:
            ptr = lists.get_ids(list_no)
            out.append(faiss.rev_swig_ptr(ptr, n).copy())
            lists.release_ids(list_no, ptr)
    return np.concatenate(out).astype(np.int64) if out else np.empty(0, np.int64)


def stores_exact(index) -> bool:
    """True when ``reconstruct`` returns the stored float32 vector bit for bit (flat storage)."""
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = index.index
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexFlat, faiss.IndexIVFFlat)):
        return True
    return isinstance(index, faiss.IndexHNSWFlat)


def remove(index, ids: np.ndarray) -> bool:
    """Remove ``ids`` in place; False when the type cannot (HNSW...) and must be rebuilt instead."""
    before = index.ntotal
    try:
        removed = index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
    except RuntimeError:
        return False            # FAISS checks support before touching anything: the index is unchanged
    return index.ntotal == before - removed == before - len(ids)


def set_search_params(index, nprobe: int | None, ef_search: int | None, space=None) -> None:
    """Apply nprobe/efSearch where the index has them (no-op for flat). ``space``: a
    ``GpuParameterSpace`` for GPU indexes."""
    space = space or faiss.ParameterSpace()
    if nprobe and faiss.try_extract_index_ivf(index) is not None:
        space.set_index_parameter(index, "nprobe", int(nprobe))
    if ef_search and not is_flat(index):
        try:
            space.set_index_parameter(index, "efSearch", int(ef_search))
        except RuntimeError:
            pass                # not an HNSW (nor an IVF with an HNSW quantizer)


def describe(index, factory: str, count: int) -> str:
    """One line for stats: the type serving a family, and why if it is the fallback."""
    if not is_fallback(index, factory):
        return factory
    return f"Flat (fallback until {min_train(factory, index.d):,} vectors train {factory}; has {count:,})"


def check_pinned(label: str, recorded: str, asked: str | None) -> None:
    if asked is not None and normalize(asked) != recorded:
        raise IncompatibleError(f"{label}: index was created with faiss factory {recorded!r}, not "
                                f"{normalize(asked)!r}; use the same --faiss-factory or a separate --index")

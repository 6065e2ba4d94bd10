"""A search-only GPU copy of the CPU snapshots (DESIGN decision 4).

GPU FAISS cannot remove ids, rejects ``add_with_ids`` on flat indexes and cannot be written
to disk, so the CPU ``IndexIDMap2`` stays the master and the GPU holds a per-family copy
made with ``index_cpu_to_gpu``, never persisted. When the family's generation changes, a flat
copy whose ids are a prefix of the master's (only adds happened) is extended in place with
``add`` (the id map grows with it); anything else (a removal, an IVF copy) is re-uploaded. GPU indexes are not thread-safe even for search, so every
GPU call runs on one dedicated worker thread that owns the ``StandardGpuResources``.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

from lorasearch.errors import UnavailableError, UsageError

from . import factory as kinds

GPU_MAX_K = 2048   # classic GPU k-selection limit (faiss/gpu/utils/DeviceDefs.cuh); larger k runs on CPU


def gpu_count() -> int:
    """GPUs usable by the installed FAISS build (0 for faiss-cpu)."""
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "index_cpu_to_gpu"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:   # a GPU build on a machine without a working driver
        return 0


def resolve_device(device: str | None) -> int | None:
    """``auto|cpu|cuda|cuda:N`` -> the GPU ordinal to use, or None for CPU only."""
    from lorasearch.devices import parse_device   # the project's one syntax for --device

    kind, ordinal = parse_device(device)
    if kind == "cpu":
        return None
    if kind == "auto":
        return 0 if gpu_count() > 0 else None
    if kind == "cuda":
        ordinal = ordinal or 0
        n = gpu_count()
        if n == 0:
            why = ("the installed FAISS has no GPU support (install the lorasearch[gpu] extra)"
                   if not hasattr(faiss, "StandardGpuResources") else "FAISS sees no CUDA device")
            raise UnavailableError(f"device {device!r} unavailable: {why}")
        if ordinal >= n:
            raise UnavailableError(f"device {device!r} unavailable: FAISS sees {n} GPU(s)")
        return ordinal
    raise UsageError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")


class GpuMirror:
    """Per-family GPU copies, keyed by (family, generation); all calls on one worker thread.

    Flat families: only the inner ``IndexFlatIP`` goes to the GPU (a plain ``GpuIndexFlatIP``,
    supported by every GPU build); result positions are mapped back to adapter ids with the
    ``id_map`` captured at upload time, so the copy and its ids always belong to the same
    generation. IVF families (faiss factory ``IVF...``) keep ids natively and are copied whole
    (GpuIndexIVFFlat/PQ/SQ). Anything else (HNSW, NSG...), or an IVF variant this FAISS build
    cannot copy, is searched on the CPU: ``search`` returns None for it.
    """

    def __init__(self, ordinal: int = 0):
        self.ordinal = ordinal
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorasearch-gpu")
        self._copies: dict[str, tuple[int, object, np.ndarray]] = {}
        self._guard = threading.Lock()
        self.uploads = 0          # whole-family uploads
        self.appends = 0          # incremental adds to an existing flat copy
        self._res = self._pool.submit(self._make_resources).result()

    # the two calls that touch the device (overridden in tests to exercise the rest without a GPU)
    def _make_resources(self):
        return faiss.StandardGpuResources()

    def _to_device(self, index):
        return faiss.index_cpu_to_gpu(self._res, self.ordinal, index)

    def _set_nprobe(self, device_index, nprobe: int) -> None:
        faiss.GpuParameterSpace().set_index_parameter(device_index, "nprobe", int(nprobe))

    def _upload(self, cpu_index):
        """(device index, id_map or None when the device index returns ids itself), or None."""
        if kinds.is_flat(cpu_index):
            return self._to_device(faiss.downcast_index(cpu_index.index)), faiss.vector_to_array(cpu_index.id_map).copy()
        if isinstance(cpu_index, (faiss.IndexIDMap, faiss.IndexIDMap2)) or faiss.try_extract_index_ivf(cpu_index) is None:
            return None                                # HNSW and friends have no GPU version
        try:
            return self._to_device(cpu_index), None
        except RuntimeError:                           # "not implemented on GPU" for this IVF variant
            return None

    def _extend(self, current, generation: int, cpu_index, epoch):
        """The flat copy moved forward by the vectors appended to ``cpu_index`` since it was made, or
        None when something else changed. ``epoch`` is the caller's token for "same CPU object, no
        removal since": a removal shifts the master (and an update of the last id would even keep
        its id map identical), so only an unchanged epoch may be extended."""
        if current is None or current[1] is None or current[1][1] is None or not kinds.is_flat(cpu_index):
            return None
        if epoch is None or current[2] != epoch:
            return None
        device_index, id_map = current[1]
        ids = faiss.vector_to_array(cpu_index.id_map)
        n0 = len(id_map)
        if len(ids) < n0 or not np.array_equal(ids[:n0], id_map):
            return None
        if len(ids) > n0:
            device_index.add(faiss.downcast_index(cpu_index.index).reconstruct_n(n0, len(ids) - n0))
        self.appends += 1
        return generation, (device_index, ids.copy()), epoch

    def _search(self, family: str, generation: int, cpu_index, queries: np.ndarray, k: int, nprobe: int,
                epoch=None):
        current = self._copies.get(family)
        if current is not None and current[0] != generation:
            extended = self._extend(current, generation, cpu_index, epoch)
            if extended is not None:
                current = self._copies[family] = extended
        if current is None or current[0] != generation:
            self._copies.pop(family, None)            # free the stale copy before uploading the new one
            current = (generation, self._upload(cpu_index), epoch)
            self.uploads += 1
            self._copies[family] = current
        if current[1] is None:
            return None
        device_index, id_map = current[1]
        if id_map is None:
            self._set_nprobe(device_index, nprobe)
            return device_index.search(queries, k)
        scores, positions = device_index.search(queries, k)
        ids = np.where(positions >= 0, id_map[np.maximum(positions, 0)], -1)
        return scores, ids

    def search(self, family: str, generation: int, cpu_index, queries: np.ndarray, k: int, nprobe: int = 1,
               epoch=None):
        """(scores, ids) like ``Index.search``, uploading the family first if its copy is stale (or
        extending it, see ``_extend``); None when this family's index type has no GPU version."""
        with self._guard:
            return self._pool.submit(self._search, family, generation, cpu_index, queries, k, nprobe,
                                     epoch).result()

    def generations(self) -> dict[str, int]:
        """Families with a live GPU copy and its generation (CPU-only families are left out)."""
        return {fam: entry[0] for fam, entry in self._copies.items() if entry[1] is not None}

    def close(self) -> None:
        with self._guard:
            self._pool.submit(self._copies.clear).result()
            self._pool.shutdown(wait=True)

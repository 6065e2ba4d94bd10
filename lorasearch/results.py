"""Typed results of every command, serialized ONE way for the CLI, the Python API and HTTP.

Each result is a dataclass; ``as_dict()`` gives the versioned JSON object ``--json`` prints
(``envelope`` adds the one ``version`` field). Result objects also answer ``result["key"]``
with the JSON view, so code written against the old dict results keeps working.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

JSON_VERSION = 1

MATCH_ORDER = {"exact": 0, "same-update": 1, "similar": 2}


def envelope(payload: dict) -> dict:
    """The one JSON envelope: ``{"version": JSON_VERSION, **payload}``."""
    return {"version": JSON_VERSION, **payload}


def to_json(result) -> str:
    """One line of JSON for a result object (or an already enveloped dict)."""
    obj = result.as_dict() if hasattr(result, "as_dict") else result
    return json.dumps(obj, default=str)


class _Result:
    def payload(self) -> dict:  # pragma: no cover - every result defines it
        raise NotImplementedError

    def as_dict(self) -> dict:
        return envelope(self.payload())

    # the old dict results' read access, for code written against them
    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.as_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return self.as_dict().get(key, default)


@dataclass
class Hit:
    rank: int
    id: int
    path: str
    score: float
    match: str                    # exact | same-update | similar
    embedding_score: float
    reranked: bool
    family: str
    format: str
    sha256: str
    scale_known: bool = True      # False: one side's alpha is unknown, so the norm was not compared
    ranks: list[int] = field(default_factory=list)    # the indexed adapter's ranks (catalog record)
    labels: list[str] = field(default_factory=list)   # its labels (``lorasearch tag``), sorted
    # re-scored from the stored re-rank "record" (no file opened) or by re-reading the "file";
    # None when not re-scored. ``score_bound``: |true ΔW cosine − score| ≤ score_bound (0 = exact)
    rescored_from: str | None = None
    score_bound: float = 0.0
    exact_cosine: float | None = None   # the exact ΔW cosine when re-scored (decides the match kind)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class QueryInfo:
    path: str
    sha256: str
    format: str
    family: str
    n_modules: int
    encoder: str
    k: int
    threshold: float | None
    indexed_in_family: int
    scale_known: bool = True
    reread: int = 0               # candidate files opened to re-score (0 when records decided all)
    ranking: str = "exact"        # how similar results are ordered: exact | encoder | fusion w=W


@dataclass
class QueryResult(_Result):
    query: QueryInfo
    hits: list[Hit] = field(default_factory=list)

    def payload(self) -> dict:
        return {"query": asdict(self.query), "results": [h.as_dict() for h in self.hits]}

    @property
    def score_meaning(self) -> str:
        """One line saying what the scores are (the CLI table's last line)."""
        reranked = {h.reranked for h in self.hits}
        bounded = any(h.score_bound > 0 for h in self.hits)
        tail = "; some within ± score_bound (from a compact record: --json)" if bounded else ""
        if self.query.ranking != "exact" and True in reranked:
            return (f"score: {'learned-encoder cosine' if self.query.ranking == 'encoder' else self.query.ranking + ': w·encoder + (1−w)·exact ΔW cosine'}"
                    "; exact ΔW cosine (exact_cosine) decides exact/same-update"
                    + ("; (e) = embedding cosine, not re-ranked" if False in reranked else ""))
        if reranked == {True}:
            return f"score: exact cosine of the weight updates ΔW (1 = same direction){tail}"
        if True in reranked:
            return f"score: exact ΔW cosine{tail}; (e) = embedding cosine, not re-ranked"
        return "score: embedding cosine (not re-ranked; --rerank N re-scores by exact ΔW cosine)"


@dataclass
class SyncReport(_Result):
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)   # (path, one-line message)

    def payload(self) -> dict:
        return {"added": self.added, "updated": self.updated, "unchanged": len(self.unchanged),
                "removed": self.removed, "errors": [{"path": p, "error": e} for p, e in self.errors]}

    def summary(self) -> str:
        return (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
                f"{len(self.removed)} removed, {len(self.errors)} failed")


@dataclass
class RemoveResult(_Result):
    removed: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)

    def payload(self) -> dict:
        return {"removed": self.removed, "not_found": self.not_found}

    def __iter__(self):            # `removed, missing = ls.remove(...)` as before
        return iter((self.removed, self.not_found))

    def summary(self) -> str:
        return f"{len(self.removed)} removed, {len(self.not_found)} not found"


@dataclass
class StatsResult(_Result):
    index: str
    stats: dict = field(default_factory=dict)

    def payload(self) -> dict:
        return {"index": self.index, **self.stats}


@dataclass
class InfoResult(_Result):
    description: dict = field(default_factory=dict)   # adapters.describe(...)
    indexed: dict | None = None   # {"index", "id", "labels"} when the file is in the --index

    def payload(self) -> dict:
        out = dict(self.description)
        if self.indexed is not None:
            out["indexed"] = dict(self.indexed)
        return out


# -- audit (issue 12): the objects `dedupe`, `explain`, `label`, `tag`, `untag`, `tag --list` print
class _Fields(_Result):
    """A result whose JSON object is its fields, in order."""

    def payload(self) -> dict:
        return asdict(self)


@dataclass
class DedupeResult(_Fields):
    threshold: float
    norm_tol: float
    k: int
    bound: float
    adapters: int
    candidate_pairs: int
    clusters: list[dict] = field(default_factory=list)      # {cluster, keep, members, pairs}
    duplicates: int = 0
    unreadable: list[dict] = field(default_factory=list)    # {id, path}: changed or gone since indexing


@dataclass
class ExplainResult(_Fields):
    query: dict
    k: int
    candidates: int
    copies_of_query: list[str]
    skipped: list[str]
    explained: float          # share of ‖ΔW‖² explained by the non-negative combination
    residual: float           # ‖ΔW − Σ cᵢ ΔWᵢ‖ / ‖ΔW‖
    sources: list[dict]       # {path, id, format, coefficient, share[, same_as]}
    verdict: str


@dataclass
class LabelResult(_Fields):
    query: dict
    k: int
    labels: list[str]
    abstained: bool
    reason: str | None
    scores: list[dict]        # {label, score, votes}
    evidence: list[dict]      # {id, path, similarity, exact, labels}
    labelled_in_family: int


@dataclass
class TagResult(_Fields):
    tagged: int               # (adapter, label) pairs asked for
    new: int                  # of those, not attached before
    not_found: list[str] = field(default_factory=list)


@dataclass
class UntagResult(_Fields):
    id: int
    path: str
    removed: int


@dataclass
class LabelsResult(_Fields):
    labels: dict[str, int] = field(default_factory=dict)    # label -> number of adapters

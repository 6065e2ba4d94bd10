"""`lorasearch dedupe | explain | label | tag | untag`: auditing a collection from its weights.

Thin wrappers over the ``Lorasearch`` facade (``dedupe``, ``explain``, ``label``, ``tag``,
``untag``, ``labels``: typed results, one JSON envelope); the conventions of the
main CLI: results on stdout, notes on stderr, ``--json`` one versioned object, errors one line
with the documented exit code (raised as ``LorasearchError`` and mapped by the group).
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import click

from lorasearch import audit
from lorasearch.errors import EXIT_MISSING, UsageError
from lorasearch.results import to_json


def _open(ctx, readonly: bool):
    from lorasearch.api import Lorasearch

    obj = ctx.obj or {}
    return Lorasearch(obj.get("index"), device=obj.get("device", "auto"), readonly=readonly,
                      lock_timeout=obj.get("lock_timeout", 0.0), store=obj.get("store"),
                      milvus_uri=obj.get("milvus_uri"), milvus_index=obj.get("milvus_index"))


def _emit(result, as_json: bool, text: str) -> None:
    click.echo(to_json(result) if as_json else text)


# ------------------------------------------------------------------------------------- dedupe
CSV_COLUMNS = ("cluster", "keep", "id", "path", "format", "dtype", "size", "family")


@click.command()
@click.option("--threshold", type=click.FloatRange(-1, 1), default=audit.SAME_UPDATE_COSINE, show_default=True,
              help="Exact ΔW cosine at or above which two adapters are the same update.")
@click.option("--norm-tol", type=click.FloatRange(min=0), default=audit.SAME_UPDATE_NORM_TOL, show_default=True,
              help="Allowed relative difference of ‖ΔW‖ (a ΔW scaled ×2 is another update).")
@click.option("-k", "k", type=click.IntRange(1, 10000), default=audit.DEDUPE_K, show_default=True,
              help="Index neighbours per adapter checked (more are fetched while all are above the bound).")
@click.option("--bound", type=click.FloatRange(-1, 1), default=audit.DEDUPE_BOUND, show_default=True,
              help="Embedding cosine above which a neighbour pair is verified exactly.")
@click.option("--family", default=None, help="Only this family.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV rows (one per cluster member).")
@click.pass_context
def dedupe(ctx, threshold, norm_tol, k, bound, family, as_json, as_csv):
    """Clusters of the same adapter across the index (copies, precision changes, conversions).

    Keeper rule: highest stored precision (F32 > F16 > BF16), then a PEFT folder, then the
    oldest file, then the lowest id."""
    if as_json and as_csv:
        raise UsageError("--json and --csv are exclusive")
    ls = _open(ctx, readonly=True)
    res = ls.dedupe(threshold=threshold, norm_tol=norm_tol, k=k, bound=bound, family=family)
    for u in res.unreadable:
        click.echo(f"lorasearch: note: skipped #{u['id']} {u['path']} (changed or gone since it was indexed)", err=True)
    if as_csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for c in res.clusters:
            for m in c["members"]:
                w.writerow([c["cluster"], "yes" if m["keep"] else "no"] + [m[col] for col in CSV_COLUMNS[2:]])
        click.echo(buf.getvalue(), nl=False)
        return
    lines = []
    for c in res.clusters:
        lines.append(f"cluster {c['cluster']}: {len(c['members'])} copies")
        for m in c["members"]:
            mark = "keep" if m["keep"] else "    "
            lines.append(f"  {mark}  #{m['id']:<6} {m['format']:<13} {m['dtype']:<5} {m['size']:>10}  {m['path']}")
    lines.append(f"{len(res.clusters)} clusters, {res.duplicates} duplicates among {res.adapters} adapters "
                 f"({res.candidate_pairs} candidate pairs verified)")
    _emit(res, as_json, "\n".join(lines))


# ------------------------------------------------------------------------------------ explain
@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-k", "k", type=click.IntRange(1, 1000), default=audit.EXPLAIN_K, show_default=True,
              help="Indexed candidates the ΔW is decomposed over.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def explain(ctx, file, k, as_json):
    """Is FILE a merge of indexed adapters? Non-negative ΔW decomposition over its top candidates."""
    res = _open(ctx, readonly=True).explain(file, k=k)
    lines = [f"explain {res.query['path']}  family={res.query['family']}",
             f"verdict: {res.verdict}"]
    for p in res.copies_of_query:
        lines.append(f"  (same update as indexed {p}; left out)")
    for s in res.sources:
        alt = f"  (same as {', '.join(s['same_as'])})" if s.get("same_as") else ""
        lines.append(f"  {s['coefficient']:8.4f} × #{s['id']:<6} {s['path']}  ({100 * s['share']:.1f} %){alt}")
    lines.append(f"explained {100 * res.explained:.1f} % of ‖ΔW‖², relative residual {res.residual:.4f} "
                 f"over {res.candidates} candidates")
    _emit(res, as_json, "\n".join(lines))


# -------------------------------------------------------------------------------------- label
@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-k", "k", type=click.IntRange(1, 1000), default=audit.LABEL_K, show_default=True)
@click.option("--min-similarity", type=click.FloatRange(-1, 1), default=audit.LABEL_MIN_SIMILARITY,
              show_default=True, help="Abstain when the nearest labelled adapter is less similar.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=audit.LABEL_MIN_AGREEMENT,
              show_default=True, help="Abstain when no label has this share of the weighted vote.")
@click.option("--rerank", type=click.IntRange(0, 10000), default=None,
              help="Labelled candidates re-scored by exact ΔW cosine (default max(5k, 50); 0 = embedding only).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def label(ctx, file, k, min_similarity, min_agreement, rerank, as_json):
    """Predict FILE's labels from its labelled neighbours (similarity-weighted kNN)."""
    res = _open(ctx, readonly=True).label(file, k=k, min_similarity=min_similarity,
                                          min_agreement=min_agreement, rerank=rerank)
    head = f"abstain: {res.reason}" if res.abstained else f"labels: {', '.join(res.labels)}"
    lines = [f"label {res.query['path']}  family={res.query['family']}", head]
    for s in res.scores[:5]:
        lines.append(f"  {s['label']:<20} {s['score']:.3f}  ({s['votes']} neighbours)")
    lines.append("evidence:")
    for e in res.evidence:
        lines.append(f"  {e['similarity']:.4f}  #{e['id']:<6} {','.join(e['labels']):<20} {e['path']}")
    _emit(res, as_json, "\n".join(lines))


# ------------------------------------------------------------------------------- tag / untag
@click.command()
@click.argument("item", required=False)
@click.argument("labels", nargs=-1)
@click.option("--labels", "labels_file", type=click.Path(path_type=Path), default=None,
              help="CSV with header name,label (name = the adapter's file or folder name; "
                   "several labels in one cell separated by ';').")
@click.option("--list", "list_", is_flag=True, help="List labels and how many adapters carry each.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def tag(ctx, item, labels, labels_file, list_, as_json):
    """Attach LABELS to the indexed adapter ITEM (id or path), or every row of --labels CSV.

    Exit 66 if some adapter is not in the index (the others are still tagged)."""
    if list_:
        if item or labels or labels_file:
            raise UsageError("--list takes no other arguments")
        res = _open(ctx, readonly=True).labels()
        _emit(res, as_json, "\n".join(f"{n:>6}  {lab}" for lab, n in res.labels.items()) or "no labels")
        return
    if bool(labels_file) == bool(item):
        raise UsageError("give either ITEM LABEL... or --labels CSV")
    if item and not labels:
        raise UsageError(f"no label given for {item}")
    res = _open(ctx, readonly=False).tag(item, labels, labels_file)
    for n in res.not_found:
        click.echo(f"lorasearch: not in index: {n}", err=True)
    _emit(res, as_json, f"{res.new} labels attached ({res.tagged - res.new} already there), "
                        f"{len(res.not_found)} not found")
    if res.not_found:
        sys.exit(EXIT_MISSING)


@click.command()
@click.argument("item")
@click.argument("labels", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def untag(ctx, item, labels, as_json):
    """Detach LABELS (all labels when none are given) from the indexed adapter ITEM (id or path)."""
    res = _open(ctx, readonly=False).untag(item, labels)
    _emit(res, as_json, f"{res.removed} labels removed from #{res.id} {res.path}")


COMMANDS = (dedupe, explain, label, tag, untag)


def attach(group: click.Group) -> None:
    for cmd in COMMANDS:
        group.add_command(cmd)

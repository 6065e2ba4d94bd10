"""`lorasearch` command line: every command is a thin wrapper over lorasearch.api.

Results go to stdout, progress, notes and errors to stderr. ``--json`` prints exactly one
versioned JSON object on stdout when the command succeeds (also for "no results" and for an
``index``/``add`` run that skipped bad files: they are listed in its ``errors``); when a command
fails, stdout stays empty and stderr gets one line ``lorasearch: error: <reason>`` — never a
traceback (``LORASEARCH_DEBUG=1`` shows it).
Exit codes: 0 ok (also "no results"), 1 unexpected internal error, 2 usage, 65 bad input file,
66 missing file/index, 69 backend or GPU unavailable, 75 index locked, 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from lorasearch.cli_common import DEVICE, EXIT_INTERRUPTED, ErrorGroup, fail, global_options, interrupted

from lorasearch import __version__
from lorasearch.errors import EXIT_BAD_INPUT, EXIT_MISSING, EXIT_USAGE, UsageError
from lorasearch.results import to_json

EXIT_INTERNAL = 1


class _Group(ErrorGroup):
    """Maps every failure, click's own included, to one line on stderr and the documented exit code;
    the commands of ``_LAZY`` are imported when first asked for."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(_LAZY))

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is None and name in _LAZY:
            cmd = _lazy_command(name)
            if cmd is not None:
                self.add_command(cmd, name)
        return cmd

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.UsageError as e:   # click's own: bad option, missing argument …
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            fail(f"error: {' '.join(e.format_message().split())}{hint}", EXIT_USAGE)
        except click.exceptions.Abort as e:
            interrupted(e.__context__ or e)
        except click.ClickException as e:
            fail(f"error: {' '.join(e.format_message().split())}", e.exit_code)
        except BrokenPipeError:                   # `lorasearch query … | head -1`
            sys.stdout = open(os.devnull, "w")
            sys.exit(EXIT_INTERNAL)
        except Exception as e:  # noqa: BLE001 -- the CLI promises one line, never a traceback
            if os.environ.get("LORASEARCH_DEBUG"):
                raise
            msg = " ".join(str(e).split()) or "(no message)"
            code = EXIT_MISSING if isinstance(e, FileNotFoundError) else EXIT_INTERNAL
            fail(f"error: {type(e).__name__}: {msg} (set LORASEARCH_DEBUG=1 for a traceback)", code)
        sys.exit(rv if isinstance(rv, int) else 0)


def _emit(result, as_json: bool, text: str) -> None:
    """A typed result (lorasearch.results) as its one JSON object, or as text."""
    click.echo(to_json(result) if as_json else text)


def _open(ctx, create=False, readonly=False, encoder=None, faiss_factory=None, nprobe=None, ef_search=None):
    from lorasearch.api import Lorasearch

    return Lorasearch(ctx.obj["index"], encoder=encoder, device=ctx.obj["device"],
                      create=create, readonly=readonly, lock_timeout=ctx.obj.get("lock_timeout", 0.0),
                      faiss_factory=faiss_factory, nprobe=nprobe, ef_search=ef_search,
                      store=ctx.obj.get("store"), milvus_uri=ctx.obj.get("milvus_uri"),
                      milvus_index=ctx.obj.get("milvus_index"))


def _factory_option(f):
    return click.option("--faiss-factory", default=None, metavar="STR",
                        help="FAISS index-factory string for a NEW index, e.g. IVF1024,Flat or HNSW32 "
                             "(default: exact Flat; an existing index keeps its own).")(f)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorasearch")
@click.option("--index", "index_path", type=click.Path(path_type=Path), envvar="LORASEARCH_INDEX",
              default=Path(".lorasearch"), show_default=True, help="Index folder (or $LORASEARCH_INDEX).")
@click.option("--device", type=DEVICE, default="auto", show_default=True,
              help="Where canonicalization and search run.")
@click.option("--lock-timeout", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds a write waits for another writer before giving up (exit 75).")
@click.option("--store", type=click.Choice(["faiss", "milvus"]), envvar="LORASEARCH_STORE", default=None,
              help="Backend of a NEW index (or $LORASEARCH_STORE; default faiss); recorded in the index folder.")
@click.option("--milvus-uri", metavar="URI", envvar="LORASEARCH_MILVUS_URI", default=None,
              help="Milvus server (http://host:19530, token in $LORASEARCH_MILVUS_TOKEN) or a milvus-lite "
                   "file (default INDEX/milvus.db); implies --store milvus.")
@click.option("--milvus-index", type=click.Choice(["FLAT", "HNSW", "IVF_FLAT"], case_sensitive=False),
              default=None, help="Milvus vector index of a NEW milvus index (default FLAT: exact).")
@click.pass_context
def cli(ctx, index_path, device, lock_timeout, store, milvus_uri, milvus_index):
    """Search LoRA adapters by what their weights do.

    Results on stdout, notes and errors on stderr (one line each). With --json a command that
    runs to the end prints exactly one JSON object (index/add/remove also when their exit code
    reports skipped or unknown items); a command that fails prints nothing on stdout.
    Exit codes: 0 ok (also no results), 1 internal error, 2 usage, 65 bad adapter file,
    66 missing file or index, 69 backend/GPU unavailable, 75 index locked, 130 interrupted."""
    ctx.ensure_object(dict)
    ctx.obj.update(index=index_path, device=device, lock_timeout=lock_timeout, store=store,
                   milvus_uri=milvus_uri, milvus_index=milvus_index and milvus_index.upper())


def _must_exist(path: Path) -> None:
    """Checked before opening the index with create=True, so a typo does not leave an empty index."""
    from lorasearch.errors import MissingError

    if not path.exists():
        raise MissingError(f"{path}: no such file or directory")


def _report_errors(report) -> None:
    for _path, msg in report.errors:
        click.echo(f"lorasearch: skipped {msg}", err=True)


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--encoder", default=None, help="Encoder spec (default: the index's, or `auto`: the shipped learned encoder for MiniLM, the sketch for every other family).")
@click.option("--prune", is_flag=True, help="Also remove indexed adapters under DIR that no longer exist.")
@_factory_option
@click.option("--ray", "use_ray", is_flag=True, help="Read and encode on Ray workers (a local Ray unless an address is given).")
@click.option("--ray-address", metavar="ADDR", default=None,
              help="An existing Ray cluster (or $RAY_ADDRESS); used with --ray.")
@click.option("--ray-workers", type=click.IntRange(min=1), default=None,
              help="CPUs of the local Ray started by --ray (default min(2, cores)).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@global_options
@click.pass_context
def index(ctx, directory, encoder, prune, faiss_factory, use_ray, ray_address, ray_workers, as_json):
    """Index every adapter under DIRECTORY (recursive, incremental).

    Bad files are reported on stderr and skipped; the exit code is 0 unless every adapter
    found was refused (65). DIRECTORY may also be one adapter file or PEFT folder."""
    _must_exist(directory)
    ls = _open(ctx, create=True, encoder=encoder, faiss_factory=faiss_factory)
    if (ray_address or ray_workers) and not use_ray:
        raise UsageError("--ray-address/--ray-workers go with --ray")
    if use_ray:
        from lorasearch.indexer.ray_ingest import index_dir_ray

        report = index_dir_ray(ls, directory, prune=prune, address=ray_address, num_cpus=ray_workers)
    else:
        report = ls.index_dir(directory, prune=prune)
    _report_errors(report)
    if not (report.added or report.updated or report.unchanged or report.errors):
        click.echo(f"lorasearch: note: no adapters found under {directory} "
                   "(looked for .safetensors files and PEFT folders)", err=True)
    _emit(report, as_json, f"{report.summary()} -> {ls.path}")
    if report.errors and not (report.added or report.updated or report.unchanged):
        sys.exit(EXIT_BAD_INPUT)   # every adapter found was refused: nothing usable here


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--encoder", default=None, help="Encoder spec (default: the index's, or `auto`: the shipped learned encoder for MiniLM, the sketch for every other family).")
@_factory_option
@click.option("--json", "as_json", is_flag=True)
@global_options
@click.pass_context
def add(ctx, files, encoder, faiss_factory, as_json):
    """Add (or refresh) adapter files or PEFT folders; a plain folder adds every adapter under it.

    Exit 66 if every failure was a missing path, 65 if any file was refused, else 0."""
    ls = _open(ctx, create=True, encoder=encoder, faiss_factory=faiss_factory)
    report = ls.add(files)
    _report_errors(report)
    _emit(report, as_json, report.summary())
    if report.errors:
        missing = all(m.endswith(("no such file or directory", "no adapters in this folder")) for _p, m in report.errors)
        sys.exit(EXIT_MISSING if missing else EXIT_BAD_INPUT)


@cli.command()
@click.argument("items", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
@global_options
@click.pass_context
def remove(ctx, items, as_json):
    """Remove adapters by id, by path (the file may be gone already) or by folder (all under it)."""
    ls = _open(ctx)
    res = ls.remove(items)
    for m in res.not_found:
        click.echo(f"lorasearch: not in index: {m}", err=True)
    _emit(res, as_json, res.summary())
    if res.not_found:
        sys.exit(EXIT_MISSING)


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("-k", "k", type=click.IntRange(1, 10000), default=10, show_default=True)
@click.option("--threshold", type=float, default=None,
              help="Drop results whose score (a cosine, -1..1) is below this.")
@click.option("--encoder", default=None, help="Must match the index's encoder.")
@click.option("--rerank", type=click.IntRange(0, 10000), default=None,
              help="Candidates re-scored by exact ΔW cosine (default max(5k, 50) within 512 MiB of files; 0 = off).")
@click.option("--nprobe", type=click.IntRange(min=1), default=None,
              help="IVF lists visited per query (approximate indexes only).")
@click.option("--ef-search", type=click.IntRange(min=1), default=None,
              help="HNSW search breadth (approximate indexes only).")
@click.option("--json", "as_json", is_flag=True)
@global_options
@click.pass_context
def query(ctx, file, k, threshold, encoder, rerank, nprobe, ef_search, as_json):
    """The K indexed adapters most similar to FILE.

    The table has a header and ends with what the scores are: the exact cosine of the weight
    updates ΔW for re-ranked candidates, the embedding cosine (marked `(e)`) for the rest. match:
    exact (same bytes), same-update (same ΔW; when one side's alpha is unknown, the same direction,
    marked `[scale unknown]`, `"scale_known": false` in --json), similar."""
    ls = _open(ctx, readonly=True, encoder=encoder, nprobe=nprobe, ef_search=ef_search)
    res = ls.query(file, k=k, threshold=threshold, rerank=rerank)
    q = res.query
    if not res.hits and not q.indexed_in_family:
        held = ", ".join(f"{f} ({n})" for f, n in ls.index.families().items()) or "nothing"
        click.echo(f"lorasearch: note: no indexed adapters of family {q.family} to compare with "
                   f"(the index holds {held})", err=True)
    _emit(res, as_json, format_query(res))


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between scans.")
@click.option("--encoder", default=None)
@click.option("--no-prune", is_flag=True, help="Keep indexed adapters whose files disappear.")
@_factory_option
@global_options
@click.pass_context
def watch(ctx, directory, interval, encoder, no_prune, faiss_factory):
    """Index adapters under DIRECTORY as they appear, change or disappear (Ctrl-C stops, exit 130).

    Prints `indexed PATH` / `removed PATH` lines on stdout as it goes; files still being
    written are waited for, not reported as errors."""
    if not interval > 0:
        raise UsageError(f"--interval must be a positive number of seconds, not {interval}")
    _must_exist(directory)
    ls = _open(ctx, create=True, encoder=encoder, faiss_factory=faiss_factory)
    first = ls.index_dir(directory, prune=not no_prune)
    _report_errors(first)
    click.echo(f"watching {directory}: {first.summary()}", err=True)

    def show(report):
        _report_errors(report)
        for p in report.added + report.updated:
            click.echo(f"indexed {p}")
        for p in report.removed:
            click.echo(f"removed {p}")
        sys.stdout.flush()

    try:
        ls.watch(directory, interval=interval, prune=not no_prune, on_report=show,
                 on_note=lambda msg: click.echo(f"lorasearch: note: {msg}", err=True))
    except KeyboardInterrupt:
        fail(f"watch stopped; the index at {ls.path} is up to date as of the last scan", EXIT_INTERRUPTED)


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@global_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def info(ctx, file, as_json):
    """Format, family, modules, ranks, alpha, metadata and trigger words of an adapter.

    If the adapter is in the index (--index, opened read-only when one exists there), also its
    id and labels ("indexed" in --json)."""
    from lorasearch.api import info as describe_file

    res = describe_file(file, index=ctx.find_root().obj.get("index"))
    _emit(res, as_json, _format_info(res.as_dict()))


def format_query(res) -> str:
    """The query table: what was asked, a header, one line per hit, and what the score means."""
    q = res.query
    lines = [f"query {q.path}  family={q.family}  encoder={q.encoder}"]
    if not res.hits:
        return "\n".join(lines + ["no results"])
    tags = [",".join(h.labels) for h in res.hits]
    width = max(map(len, tags))                  # a labels column only when some hit has labels
    width = max(width, len("labels")) if width else 0
    lab = (lambda t: f"{t:<{width}}  ") if width else (lambda t: "")
    lines.append(f"{'rank':>4}  {'score':>7}  {'match':<11}  {'id':<7} {lab('labels')}path")
    for h, t in zip(res.hits, tags):
        flag = "" if h.reranked else " (e)"
        note = "" if h.scale_known else "  [scale unknown]"
        lines.append(f"{h.rank:>4}  {h.score:>7.4f}  {h.match:<11}  #{h.id:<6} {lab(t)}{h.path}{flag}{note}")
    lines.append(res.score_meaning)
    if any(not h.scale_known for h in res.hits):
        lines.append("[scale unknown]: alpha is unknown on one side, so same-update compares direction only")
    return "\n".join(lines)


def _format_info(d: dict) -> str:
    lines = [f"{k}: {d[k]}" for k in ("path", "format", "family", "sha256", "size", "n_modules") if k in d]
    for key in ("ranks", "alphas", "trigger_words", "unknown_keys", "warnings"):
        if d.get(key):
            lines.append(f"{key}: {d[key]}")
    if d.get("indexed"):
        ix = d["indexed"]
        lines.append(f"indexed: #{ix['id']} in {ix['index']}")
        lines.append(f"labels: {', '.join(ix['labels']) or 'none'}")
    meta = d.get("metadata") or {}
    if meta:
        lines.append("metadata:")
        lines += [f"  {k}: {str(v)[:120]}" for k, v in meta.items()]
    mods = d.get("modules") or []
    if mods:
        lines.append(f"modules ({len(mods)}):")
        for m in mods:
            lines.append("  " + "  ".join(str(m.get(k)) for k in ("name", "shape", "rank", "alpha", "scale", "dtype")))
    return "\n".join(lines)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@global_options
@click.pass_context
def stats(ctx, as_json):
    """Adapters per family, encoder, size of the index."""
    res = _open(ctx, readonly=True).stats()
    _emit(res, as_json, "\n".join(f"{k}: {v}" for k, v in res.as_dict().items() if k != "version"))


# Commands that live in their own modules, imported only when they run (or for --help): a default
# `query` must not pay for the audit, service, eval and training modules (issue 8: cold query cost).
# `eval` and `train` live in the eval package (training takes eval's metrics as its evaluator) and
# are attached here by name only, so nothing in the package proper imports ``lorasearch.eval``.
_LAZY = {
    "data": ("lorasearch.cli_data", "data"),
    "train": ("lorasearch.eval.train_cli", "train"),
    "eval": ("lorasearch.eval.cli", "eval_group"),
    "serve": ("lorasearch.cli_serve", "serve"),   # fastapi/uvicorn only when `serve` runs
    "dedupe": ("lorasearch.cli_audit", "dedupe"),  # issue 12's audit commands
    "explain": ("lorasearch.cli_audit", "explain"),
    "label": ("lorasearch.cli_audit", "label"),
    "tag": ("lorasearch.cli_audit", "tag"),
    "untag": ("lorasearch.cli_audit", "untag"),
}


def _lazy_command(name: str):
    import importlib

    mod, attr = _LAZY[name]
    try:
        return getattr(importlib.import_module(mod), attr, None)
    except ModuleNotFoundError as e:
        if e.name != mod:
            raise
        return None




def main() -> None:
    cli(obj={})


if __name__ == "__main__":
    main()

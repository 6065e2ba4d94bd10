"""The one place CLI failures become one line on stderr plus the documented exit code.

Shared by the main group and the `data` / `eval` groups (which tests also run on their own)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from lorasearch.errors import LorasearchError

EXIT_INTERRUPTED = 130
DEVICE = click.Choice(["auto", "cpu", "cuda"])


def fail(message: str, code: int):
    click.echo(f"lorasearch: {message}", err=True)
    sys.exit(code)


def interrupted(e: BaseException):
    report = getattr(e, "partial_report", None)
    kept = "" if report is None else \
        f"; kept {len(report.added)} added and {len(report.updated)} updated before it (the index is consistent)"
    fail(f"interrupted{kept}", EXIT_INTERRUPTED)


class ErrorGroup(click.Group):
    """A click group whose commands' lorasearch errors exit with one line and their code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LorasearchError as e:
            fail(f"error: {e}", e.exit_code)
        except KeyboardInterrupt as e:
            interrupted(e)


def _set_global(ctx, param, value):
    """Global options (`--index`, `--device`, `--store` …) given after the subcommand override the group's."""
    if value is not None:
        root = ctx.find_root()
        root.ensure_object(dict)
        root.obj[param.name] = value
    return value


_GLOBALS = {
    "index": lambda: click.option("--index", "index", type=click.Path(path_type=Path), default=None,
                                  expose_value=False, callback=_set_global,
                                  help="Index folder (same as before the command)."),
    "device": lambda: click.option("--device", "device", type=DEVICE, default=None, expose_value=False,
                                   callback=_set_global, help="auto|cpu|cuda (same as before the command)."),
    "lock_timeout": lambda: click.option("--lock-timeout", "lock_timeout", type=click.FloatRange(min=0),
                                         default=None, expose_value=False, callback=_set_global,
                                         help="Seconds to wait for another writer (same as before the command)."),
    "store": lambda: click.option("--store", "store", type=click.Choice(["faiss", "milvus"]), default=None,
                                  expose_value=False, callback=_set_global,
                                  help="faiss|milvus for a NEW index (same as before the command)."),
    "milvus_uri": lambda: click.option("--milvus-uri", "milvus_uri", metavar="URI", default=None,
                                       expose_value=False, callback=_set_global,
                                       help="Milvus server or milvus-lite file (same as before the command)."),
    "milvus_index": lambda: click.option("--milvus-index", "milvus_index",
                                         type=click.Choice(["FLAT", "HNSW", "IVF_FLAT"], case_sensitive=False),
                                         default=None, expose_value=False,
                                         callback=lambda ctx, p, v: _set_global(ctx, p, v and v.upper()),
                                         help="Milvus vector index of a NEW index (same as before the command)."),
}


def global_options(f, names=("index", "device", "lock_timeout", "store", "milvus_uri", "milvus_index")):
    """The group's options, accepted after the subcommand too (`lorasearch index DIR --index X`)."""
    for name in reversed(names):
        f = _GLOBALS[name]()(f)
    return f


def device_option(f):
    """``--device`` after an `eval` subcommand (the main group's option, in the other place)."""
    return global_options(f, ("device",))

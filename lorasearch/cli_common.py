"""The one place CLI failures become one line on stderr plus the documented exit code.

Shared by the main group and the `data` / `eval` groups (which tests also run on their own)."""
from __future__ import annotations

import sys

import click

from lorasearch.errors import LorasearchError

EXIT_INTERRUPTED = 130


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

"""`lorasearch data …`: build LoRA collections (the factory in ``lorasearch.data``).

    lorasearch data make language --out collections/lang --device cuda --n 100 --seed 0
    lorasearch data make diffusion --out collections/diff --device cuda --n 2000
    lorasearch data make language --out /tmp/t --tiny          # a few adapters in seconds, on CPU
    lorasearch data demo --out data/demo                         # the bundled demo collection

Progress goes to stderr; the command prints a one-object JSON summary on stdout.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import click

from lorasearch.cli_common import ErrorGroup

from lorasearch.errors import UnavailableError, UsageError
from lorasearch.results import envelope

SUITES = ("language", "language-x", "diffusion")


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a CUDA device is visible, else ``cpu``; ``cuda`` without one is an error."""
    from lorasearch.devices import resolve_device as resolve

    dev = resolve(device)
    return "cpu" if dev == "cpu" else "cuda"


def make(suite: str, out, n: int | None = None, seed: int = 0, device: str = "auto", tiny: bool = False,
         tasks: list[str] | None = None) -> dict:
    """The Python face of ``lorasearch data make``; returns the collection's summary."""
    if suite not in SUITES:
        raise UsageError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    if n is not None and n < 1:
        raise UsageError(f"--n must be at least 1, not {n}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    dev = resolve_device(device)
    log = lambda msg: click.echo(f"[data {suite}] {msg}", err=True)  # noqa: E731
    if suite == "language-x":
        from lorasearch.data.language_x import make_collection as make_x
        if tasks:
            raise UsageError("--task applies to the language suite only")
        return make_x(out, n=n or (12 if tiny else 1500), seed=seed, device=dev, tiny=tiny, log=log)
    if suite == "language":
        from lorasearch.data.language import make_collection
        return make_collection(out, n=n, seed=seed, device=dev, tiny=tiny, tasks=tasks, log=log)
    try:
        mod = importlib.import_module("lorasearch.data.diffusion")
    except ModuleNotFoundError as e:
        if e.name != "lorasearch.data.diffusion":
            raise UnavailableError(f"the diffusion suite needs {e.name} (pip install 'lorasearch[train]')") from e
        raise UnavailableError("the diffusion suite (lorasearch.data.diffusion) is not installed in this build") from e
    fn = getattr(mod, "make_collection", None)
    if fn is None:
        raise UnavailableError("lorasearch.data.diffusion has no make_collection(out, n, seed, device, tiny)")
    if tasks:
        raise UsageError("--task applies to the language suite only")
    if n is None:
        n = 4 if tiny else 2000 if dev == "cuda" else 20
    res = fn(out, n, seed, dev, tiny)
    return res if isinstance(res, dict) else {"manifest": str(res)}


@click.group(name="data", cls=ErrorGroup)
def data() -> None:
    """Build LoRA collections: fine-tune real adapters in batches, write them with a manifest."""


@data.command("make")
@click.argument("suite", type=click.Choice(SUITES))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write the collection into.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--n", type=int, default=None,
              help="language: gallery adapters per task; language-x, diffusion: adapters in all. Default by device.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tiny", is_flag=True, help="A few adapters in seconds on CPU (what the tests run).")
@click.option("--task", "tasks", multiple=True, help="language: only these tasks (repeatable).")
def make_cmd(suite, out, device, n, seed, tiny, tasks):
    """Fine-tune the SUITE collection (language or diffusion) into --out."""
    summary = make(suite, out, n=n, seed=seed, device=device, tiny=tiny, tasks=list(tasks) or None)
    click.echo(json.dumps(envelope({"suite": suite, "out": str(out), **(summary or {})}), default=str))


@data.command("demo")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo_cmd(out, seed):
    """Regenerate the bundled demo collection (4 tasks of MiniLM LoRAs, a few minutes on CPU)."""
    from lorasearch.data.make_demo import make_demo
    make_demo(out, seed, log=lambda m: click.echo(m, err=True))

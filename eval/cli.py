"""`lorasearch eval …`: retrieval, probe, invariance, report and the speed benchmarks.

Each command is a thin wrapper over a function in ``lorasearch.eval``; ``--json`` prints one
versioned object with a ``kind``. Inputs are a gallery folder + queries folder + labels CSV,
or a collection folder with ``manifest.parquet`` (``--collection``).
"""
from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

import click

from lorasearch.cli_common import ErrorGroup, device_option

from lorasearch.errors import UsageError
from lorasearch.results import envelope

PATH = click.Path(path_type=Path)


def _device(ctx) -> str:
    obj = ctx.find_root().obj
    return obj.get("device", "auto") if isinstance(obj, dict) else "auto"


def _split_labels(values) -> list[str] | None:
    out = [v.strip() for val in values or () for v in val.split(",") if v.strip()]
    return out or None


def _inputs(f):
    """The options every command that reads a labelled set of adapters shares."""
    opts = [
        click.option("--gallery", type=PATH, help="Folder of gallery adapters."),
        click.option("--queries", type=PATH, help="Folder of query adapters."),
        click.option("--labels", type=PATH, help="CSV with header name,label[,shots]."),
        click.option("--collection", type=PATH, help="Collection folder with manifest.parquet (instead of the three above)."),
        click.option("--label-column", default=None, help="Manifest column holding the label (default: label/task/superclass)."),
        click.option("--encoder", "encoders", multiple=True, default=("auto", "sketch"), show_default=True,
                     help="Encoder spec; repeat to compare several."),
        click.option("--labels-subset", multiple=True, help="Evaluate only these labels (comma-separated or repeated): held-out tasks."),
        click.option("--exclude-labels", multiple=True, help="Leave these labels out (e.g. the ones an encoder was trained on)."),
        click.option("--keep-gallery", is_flag=True, help="Apply the label selection to queries only; keep every gallery adapter as a distractor."),
        device_option,
    ]
    return functools.reduce(lambda g, o: o(g), reversed(opts), f)


def _load_set(ctx, gallery, queries, labels, collection, label_column, labels_subset, exclude_labels, keep_gallery):
    from lorasearch.eval import retrieval as R

    if collection is not None and (gallery or queries or labels):
        raise UsageError("give either --collection or --gallery/--queries/--labels, not both")
    if collection is not None:
        es = R.from_collection(collection, label_column)
    elif gallery is not None and queries is not None and labels is not None:
        es = R.from_folders(gallery, queries, labels)
    else:
        raise UsageError("give --collection DIR, or all of --gallery DIR --queries DIR --labels CSV")
    inc, exc = _split_labels(labels_subset), _split_labels(exclude_labels)
    if inc or exc:
        es = R.select_labels(es, inc, exc, filter_gallery=not keep_gallery)
    return R.load(es, device=_device(ctx))


def _strengths(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--strengths must be comma-separated numbers, got {text!r}") from None


def _write_json(obj: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(obj, indent=1, default=str) + "\n")


@click.group("eval", cls=ErrorGroup)
def eval_group():
    """Measure retrieval quality, probes, invariance and speed."""


@eval_group.command("retrieval")
@_inputs
@click.option("--no-references", is_flag=True, help="Skip the rawcos and dense reference methods.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Cut-off of NDCG/mAP/Recall.")
@click.option("--rerank", type=click.IntRange(min=0), default=None,
              help="Re-ranking depth measured as `ENCODER+rerank@N` (what `lorasearch query` returns), beside "
                   "the bare encoder. Default: query's own depth for this k, max(5k, 50); 0 = bare encoder only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--out", type=PATH, help="Also write the JSON object to this file.")
@click.pass_context
def retrieval_cmd(ctx, gallery, queries, labels, collection, label_column, encoders, labels_subset,
                  exclude_labels, keep_gallery, no_references, rerank, k, as_json, out):
    """Query/gallery retrieval: NDCG@10, Hit@1, mAP@10, Recall@10 per method, label and shots.

    By default each encoder is measured as `lorasearch query` uses it (its top candidates re-scored
    by the exact ΔW cosine: `ENCODER+rerank@N`) and bare beside it."""
    from lorasearch.eval import retrieval as R

    es = _load_set(ctx, gallery, queries, labels, collection, label_column, labels_subset,
                   exclude_labels, keep_gallery)
    methods = R.default_methods(encoders, k, rerank, references=not no_references)
    result = R.public(R.evaluate(es, methods, k))
    _write_json(result, out)
    click.echo(json.dumps(result, default=str) if as_json else R.format_table(result))


@eval_group.command("probe")
@_inputs
@click.option("--seeds", default=10, show_default=True, help="Runs (each its own split and init).")
@click.option("--max-epochs", default=300, show_default=True)
@click.option("--hidden", default=512, show_default=True, help="Width of the 3 hidden layers.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", type=PATH, help="Also write the JSON object to this file.")
@click.pass_context
def probe_cmd(ctx, gallery, queries, labels, collection, label_column, encoders, labels_subset,
              exclude_labels, keep_gallery, seeds, max_epochs, hidden, as_json, out):
    """LoRA-WS classification probe (70/10/20, MLP 3x512, 10 seeds) on each encoder's embeddings."""
    from lorasearch.eval import probe as P
    from lorasearch.eval.report import embed_all

    es = _load_set(ctx, gallery, queries, labels, collection, label_column, labels_subset,
                   exclude_labels, keep_gallery)
    reps, labs = embed_all(es, encoders)
    result = P.probe_representations(reps, labs, seeds, max_epochs=max_epochs, hidden=hidden)
    _write_json(result, out)
    click.echo(json.dumps(result, default=str) if as_json else P.format_table(result))


@eval_group.command("invariance")
@_inputs
@click.option("--strengths", default="0,0.25,0.5,1,1.5,2", show_default=True, help="Comma-separated t values.")
@click.option("--mode", type=click.Choice(["expm", "additive"]), default="expm", show_default=True,
              help="G = expm(t·X) or G = I + t·N.")
@click.option("--max-adapters", default=64, show_default=True, help="Use at most this many adapters per family.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", type=PATH, help="Also write the JSON object to this file.")
@click.pass_context
def invariance_cmd(ctx, gallery, queries, labels, collection, label_column, encoders, labels_subset,
                   exclude_labels, keep_gallery, strengths, mode, max_adapters, seed, as_json, out):
    """Embedding drift and top-10 overlap under random GL(r) reparameterization (W2T Fig. 5)."""
    from lorasearch.eval import invariance as I
    from lorasearch.eval.report import adapters_by_family

    ts = _strengths(strengths)
    es = _load_set(ctx, gallery, queries, labels, collection, label_column, labels_subset,
                   exclude_labels, keep_gallery)
    methods = list(encoders) + ["rawcos", "dense"]
    results = {fam: I.drift_curves(ads, methods, ts, mode, seed=seed, device=_device(ctx))
               for fam, ads in adapters_by_family(es, max_adapters).items() if len(ads) >= 2}
    obj = envelope({"kind": "invariance", "families": results})
    _write_json(obj, out)
    if as_json:
        click.echo(json.dumps(obj, default=str))
    else:
        for fam, r in results.items():
            click.echo(f"family {fam}: {r['n_adapters']} adapters, mode {mode}\n{I.format_table(r)}")


@eval_group.command("report")
@_inputs
@click.option("--out", "out_dir", type=PATH, required=True, help="Folder for report.md, results.json and the PNGs.")
@click.option("--probe/--no-probe", "do_probe", default=True, show_default=True)
@click.option("--invariance/--no-invariance", "do_invariance", default=True, show_default=True)
@click.option("--seeds", default=10, show_default=True, help="Probe seeds.")
@click.option("--max-epochs", default=300, show_default=True, help="Probe epochs at most (early stopping).")
@click.option("--strengths", default="0,0.25,0.5,1,1.5,2", show_default=True, help="Invariance strengths t.")
@click.option("--title", default="lorasearch evaluation")
@click.pass_context
def report_cmd(ctx, gallery, queries, labels, collection, label_column, encoders, labels_subset,
               exclude_labels, keep_gallery, out_dir, do_probe, do_invariance, seeds, max_epochs, strengths, title):
    """Run retrieval (+ probe, invariance) and write a Markdown report with PNG plots."""
    from lorasearch.eval import report as Rep

    es = _load_set(ctx, gallery, queries, labels, collection, label_column, labels_subset,
                   exclude_labels, keep_gallery)
    path = Rep.build_report(es, list(encoders), out_dir, probe=do_probe, invariance=do_invariance,
                            seeds=seeds, title=title, device=_device(ctx),
                            probe_kw={"max_epochs": max_epochs}, strengths=_strengths(strengths))
    click.echo(Rep.headline_table(json.loads((out_dir / "results.json").read_text())["retrieval"]))
    click.echo(f"report: {path}", err=True)


def _parse_set(values, params) -> dict:
    """``KEY=VALUE`` pairs for a benchmark's ``run``; VALUE is JSON when it parses (``sizes=[1000]``)."""
    out = {}
    for item in values:
        key, eq, raw = item.partition("=")
        if not eq or key not in params:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(params)}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _bench_command(name: str, module: str, doc: str):
    @eval_group.command(name, help=doc)
    @click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                  help="Argument of the benchmark's run(), e.g. --set sizes=[10000] (JSON values).")
    @click.option("--json", "as_json", is_flag=True)
    @click.option("--out", type=PATH, help="Also write the rows as JSON to this file.")
    @click.pass_context
    def cmd(ctx, settings, as_json, out):
        import importlib

        try:
            mod = importlib.import_module(f"lorasearch.eval.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"lorasearch.eval.{module}":
                raise
            raise UsageError(f"the {name} benchmark (lorasearch.eval.{module}) is not installed") from None
        params = list(inspect.signature(mod.run).parameters)
        kw = _parse_set(settings, params)
        if "device" in params and "device" not in kw:
            kw["device"] = _device(ctx)
        rows = mod.run(**kw)
        obj = envelope({"kind": name, "settings": kw, "rows": rows})
        _write_json(obj, out)
        click.echo(json.dumps(obj, default=str) if as_json else mod.format_markdown(rows))

    return cmd


_bench_command("canonical", "bench_canonical",
               "QR-SVD canonicalization vs dense SVD: singular-value and ΔW gaps and speed-up (W2T Table 4).")
_bench_command("index", "bench_index",
               "Indexing throughput vs reading the bytes, and query latency at 10k/100k adapters.")

"""`lorasearch serve`: the HTTP API and web page over an index (needs the `serve` extra).

Safe by default: binds to 127.0.0.1 and says so; another address only when asked with --host,
with a warning when no token was chosen (a generated one is printed once). Writes always need
the bearer token; reads are open unless --protect-reads.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

import click

from lorasearch.errors import EXIT_UNAVAILABLE, UsageError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback exposes the index to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=8750, show_default=True)
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=512.0, show_default=True,
              help="Uploads larger than this are refused while they arrive (HTTP 413).")
@click.option("--token", default=None, envvar="LORASEARCH_TOKEN",
              help="Bearer token for writes (or $LORASEARCH_TOKEN; default: generated and printed once).")
@click.option("--protect-reads", is_flag=True, help="Reads need the token too (the page and /healthz stay open).")
@click.option("--write-wait", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds a write waits for another writer before answering 409.")
@click.option("--create", is_flag=True, help="Create the index folder if there is none yet.")
@click.pass_context
def serve(ctx, host, port, max_upload_mb, token, protect_reads, write_wait, create):
    """Serve the index over HTTP: JSON API + a web page to search and browse (GET /)."""
    try:
        import uvicorn

        from lorasearch.server import create_app
    except ModuleNotFoundError as e:
        click.echo(f"lorasearch: error: `serve` needs the serve extra ({e.name} is missing): "
                   "pip install 'lorasearch[serve]'", err=True)
        ctx.exit(EXIT_UNAVAILABLE)
    index_path = Path(ctx.obj["index"])
    if create:
        from lorasearch.api import Lorasearch

        Lorasearch(index_path, create=True, device="cpu").close()
    if token is not None and len(token) < 16:
        raise UsageError("--token must be at least 16 characters")
    chosen = token is not None
    token = token or secrets.token_urlsafe(24)
    device = ctx.obj.get("device", "auto")
    app = create_app(index_path, token=token, max_upload_mb=max_upload_mb,
                     device="cpu" if device == "auto" else device, write_wait=write_wait,
                     protect_reads=protect_reads)
    url_host = f"[{host}]" if ":" in host else host
    if is_loopback(host):
        click.echo(f"lorasearch: serving {index_path.resolve()} on http://{url_host}:{port}/ "
                   "(loopback only; --host 0.0.0.0 to expose it)", err=True)
    else:
        click.echo(f"lorasearch: serving {index_path.resolve()} on http://{url_host}:{port}/ "
                   f"-- reachable from the network", err=True)
        if not chosen:
            click.echo("lorasearch: warning: no --token / $LORASEARCH_TOKEN set while binding beyond loopback; "
                       "writes use the generated token below"
                       + ("" if protect_reads else " and reads are open to anyone who can reach this port"),
                       err=True)
    if not chosen:
        click.echo(f"lorasearch: write token (shown once): {token}", err=True)
    os.environ.pop("LORASEARCH_TOKEN", None)   # not inherited by anything this process starts
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)

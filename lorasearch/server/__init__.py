"""`lorasearch serve`: the HTTP API and the web page (optional extra `serve`: fastapi, uvicorn,
python-multipart). ``create_app(index_path, token=…)`` builds the FastAPI app."""
from __future__ import annotations


def create_app(*args, **kwargs):
    from lorasearch.server.app import create_app as _create_app

    return _create_app(*args, **kwargs)

"""issue 8: the default encoder's commands run on numpy + faiss + safetensors only.

Each command runs through the CLI entry point (``lorasearch.cli:main``) in a fresh interpreter that
reports at exit whether ``torch`` was ever imported. fp16/bf16 files are decoded by the reader in
numpy; an fp8 file would still need torch (reader's business, not tested here)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from lorasearch.adapters.writers import random_adapter, write_adapter

HOOK = ("import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('TORCH-IMPORTED=%s\\n' % ('torch' in sys.modules)))\n"
        "from lorasearch.cli import main\n"
        "sys.argv = ['lorasearch'] + sys.argv[1:]\n"
        "main()\n")


def run(*args, index):
    p = subprocess.run([sys.executable, "-c", HOOK, "--index", str(index), *args], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "LORASEARCH_INDEX": str(index)})
    return p


def torch_flag(stderr: str) -> str:
    lines = [l for l in stderr.splitlines() if l.startswith("TORCH-IMPORTED=")]
    assert lines, f"the hook did not report; stderr: {stderr[-2000:]}"
    return lines[-1].split("=", 1)[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    paths = []
    # the default `auto` encoder: SD files go to the sketch, the MiniLM one to subspace:minilm-x
    for i, (fmt, dt, arch) in enumerate([("kohya", "F16", "sd15"), ("kohya", "BF16", "sd15"), ("peft", "F32", "minilm"),
                                         ("kohya", "F16", "sd15")]):
        targets = r"attention\.self\.(query|value)$" if arch == "minilm" else r"attn2\.to_[kv]"
        ad = random_adapter(arch, rank=4, seed=i, targets=targets)
        p = root / (f"a{i}" if fmt == "peft" else f"a{i}.safetensors")
        write_adapter(ad, p, fmt, dtype=dt)
        paths.append(p)
    return root, paths


def test_default_commands_never_import_torch(files, tmp_path):
    root, paths = files
    index = tmp_path / "idx"
    extra = paths[3]
    hidden = tmp_path / "extra.safetensors"
    os.replace(extra, hidden)                 # added later with `add`
    steps = [("index", str(root)), ("query", str(paths[0]), "-k", "3"), ("query", str(paths[2]), "-k", "3"), ("add", str(hidden)),
             ("query", str(paths[1]), "--json"), ("info", str(paths[1])), ("stats",), ("remove", str(hidden))]
    for args in steps:
        p = run(*args, index=index)
        assert p.returncode == 0, (args, p.stderr[-2000:])
        assert torch_flag(p.stderr) == "False", f"`lorasearch {' '.join(args)}` imported torch"
    os.replace(hidden, extra)


def test_watch_never_imports_torch(files, tmp_path):
    root, paths = files
    index = tmp_path / "idx"
    proc = subprocess.Popen([sys.executable, "-c", HOOK, "--index", str(index), "watch", str(root),
                             "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (index.exists() and any(index.iterdir())):
            time.sleep(0.2)
        time.sleep(2.0)                        # a couple of polls: files settle and get indexed
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    assert torch_flag(err) == "False", err[-2000:]

"""Coverage-guided fuzzing (atheris / libFuzzer) of the safetensors header parser and the PEFT config
parser, for a fixed time. Benchmark script, not part of the test run; needs ``pip install atheris``
(in the ``dev`` extra).

    python -m eval.bench.fuzz_atheris --target header --seconds 150 --out /tmp/header.json
    python -m eval.bench.fuzz_atheris --target config --seconds 90  --out /tmp/config.json

header  the input bytes are written to a file (``/dev/shm`` when there is one) and read with
        ``load_adapter`` + ``describe``: length field, JSON header, entries, metadata, key grammar,
        family and names (the seed corpus is the real adapter files of ``fuzz_reader.make_seeds``).
config  the input is the text of an ``adapter_config.json`` / ``lora_adapter_metadata``: parsed with
        the reader's bounded JSON loader, validated by ``AlphaConfig`` and its patterns matched against
        real module paths; also fed to ``trigger_words`` as ``ss_tag_frequency``.

A ``LorasearchError`` is the expected answer to bad input. Any other exception is a finding: it is
recorded (type, place, input) and fuzzing goes on, so one run counts all findings; the counts are
written to ``--out`` every few seconds (libFuzzer ends the process without running Python's exit hooks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import logging

import atheris

logging.disable(logging.CRITICAL)     # the reader's per-file warnings are expected output, not findings
with atheris.instrument_imports():
    from lorasearch.adapters import describe, load_adapter
    from lorasearch.adapters.patterns import AlphaConfig
    from lorasearch.adapters.reader import trigger_words
    from lorasearch.adapters.safetensors_strict import loads_limited
    from lorasearch.errors import LorasearchError

MODULE_PATHS = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "encoder.layer.0.attention.self.query",
                "text_model.encoder.layers.11.self_attn.v_proj", "layers.0.self_attn.q_proj", "x" * 300]
STATE = {"execs": 0, "accepted": 0, "refused": 0, "findings": {}, "start": time.time(), "last": 0.0}
OUT: Path | None = None
TARGET = ""
SCRATCH = Path(tempfile.mkdtemp(prefix="lorasearch-atheris-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


def _record(e: BaseException, data: bytes) -> None:
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
    key = f"{type(e).__name__} at {where}"
    f = STATE["findings"].setdefault(key, {"count": 0, "message": str(e)[:200], "input_hex": data[:512].hex()})
    f["count"] += 1


def _flush(force: bool = False) -> None:
    now = time.time()
    if OUT is None or (not force and now - STATE["last"] < 3):
        return
    STATE["last"] = now
    out = {"target": TARGET, "execs": STATE["execs"], "accepted": STATE["accepted"], "refused": STATE["refused"],
           "findings": STATE["findings"], "seconds": round(now - STATE["start"], 1)}
    OUT.write_text(json.dumps(out, indent=1))


def header_target(data: bytes) -> None:
    STATE["execs"] += 1
    p = SCRATCH / "x.safetensors"
    p.write_bytes(data)
    try:
        json.dumps(describe(load_adapter(p)))
        STATE["accepted"] += 1
    except LorasearchError:
        STATE["refused"] += 1
    except Exception as e:      # noqa: BLE001 - a finding
        _record(e, data)
    _flush()


def config_target(data: bytes) -> None:
    STATE["execs"] += 1
    text = data.decode("utf-8", "replace")
    try:
        cfg = loads_limited("cfg", text, "adapter_config.json")
        if isinstance(cfg, dict):
            ac = AlphaConfig("cfg", cfg, "adapter_config.json")
            for m in MODULE_PATHS:
                ac.alpha_scale(m, 4)
        trigger_words({"ss_tag_frequency": text, "modelspec.trigger_phrase": text[:50]})
        STATE["accepted"] += 1
    except LorasearchError:
        STATE["refused"] += 1
    except Exception as e:      # noqa: BLE001 - a finding
        _record(e, data)
    _flush()


CONFIG_SEEDS = [
    b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"query": 2}, "rank_pattern": {"value": 2}}',
    b'{"lora_alpha": "8", "use_rslora": "true", "alpha_pattern": {"layers\\\\.[0-9]+\\\\.self_attn": 16}}',
    b'{"10_x": {"tag": 3, "other": 1}}',
    b'{"unet.lora_alpha": 4, "unet.r": 2}',
]


def main(argv=None) -> int:
    global OUT, TARGET
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", choices=["header", "config"], required=True)
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--out", type=Path, required=True)
    args, rest = ap.parse_known_args(argv)
    OUT, TARGET = args.out, args.target
    corpus = Path(tempfile.mkdtemp(prefix="lorasearch-atheris-corpus-"))
    if args.target == "header":
        from eval.bench.fuzz_reader import make_seeds
        for p in make_seeds(corpus / "seeds"):
            src = p / "adapter_model.safetensors" if p.is_dir() else p
            (corpus / p.name).write_bytes(src.read_bytes())
        import shutil
        shutil.rmtree(corpus / "seeds")
    else:
        for i, s in enumerate(CONFIG_SEEDS):
            (corpus / f"seed{i}.json").write_bytes(s)
    _flush(force=True)
    import atexit
    atexit.register(_flush, True)
    atheris.Setup([sys.argv[0], f"-max_total_time={args.seconds}", "-rss_limit_mb=4096", "-max_len=65536",
                   "-timeout=10", *rest, str(corpus)],
                  header_target if args.target == "header" else config_target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())

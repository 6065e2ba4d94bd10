"""Mutation fuzzing of the adapter reader: real adapter files of every format, mutated, each read in a
child process with a timeout. Benchmark script, not part of the test run.

    python -m eval.bench.fuzz_reader --files 10000 --workers 1 --timeout 10 --out eval/results/fuzz.json

Seeds are written by ``lorasearch.adapters.writers`` and by hand in the key grammars of kohya (SD1.5,
SDXL, LoCon, Flux BFL), PEFT (folder and bare file, MiniLM), diffusers (three generations, with
``lora_adapter_metadata``), DiffSynth Flux, bf16 and fp8 tensors. Each mutant gets 1–3 mutations:
byte flips, truncation, header-length lies, JSON edits of the header (dtype, shape, offsets, keys,
``__metadata__``: deep nesting, huge numbers, non-finite values, hostile ``alpha_pattern``), edits of
``adapter_config.json``, tensor data replaced by NaN/Inf/huge values, foreign containers (pickle, zip,
GGUF, HTML, JSON, ELF, gzip, text, empty) and special files (FIFO, socket, dangling or looping symlink,
a folder named ``.safetensors``, a symlink to ``/dev/zero``).

Each file goes through ``load_adapter`` + ``describe`` + ``json.dumps`` + ``adapter_sha256`` in a worker
process. Outcomes: ``accepted``; ``refused`` (a ``LorasearchError``: the project's own one-line error);
``other`` (any other exception: a bug); ``hang`` (no answer within the timeout: the worker is killed
and replaced); ``signal`` (the worker died). Python warnings raised while reading are counted too.
The pool is our own (not ``multiprocessing.Pool``) because a pool cannot kill one hung task and go on.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

OUTCOMES = ("accepted", "refused", "other", "hang", "signal")


# ---- worker ---------------------------------------------------------------------------------------
def _worker(conn) -> None:
    import logging
    import traceback
    import warnings

    logging.disable(logging.CRITICAL)        # the reader's own warnings are expected output, not findings
    from lorasearch.adapters import adapter_sha256, describe, load_adapter
    from lorasearch.errors import LorasearchError

    while True:
        try:
            path = conn.recv()
        except EOFError:
            return
        if path is None:
            return
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ad = load_adapter(path)
                json.dumps(describe(ad))
                adapter_sha256(path)
                res = ("accepted", "")
            except LorasearchError as e:
                msg = str(e)
                res = ("refused", msg) if "\n" not in msg else ("other", "multi-line error: " + msg[:200])
            except BaseException as e:       # noqa: BLE001 - this is what the fuzzer looks for
                tb = traceback.extract_tb(e.__traceback__)
                where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
                res = ("other", f"{type(e).__name__} at {where}: {str(e)[:200]}")
        conn.send((res[0], res[1], time.perf_counter() - t0, [str(w.message)[:120] for w in caught]))


class Worker:
    def __init__(self, ctx):
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def run(self, path: str, timeout: float):
        """(outcome, message, seconds, warnings); kills itself on a hang or a death."""
        self.parent.send(path)
        if self.parent.poll(timeout):
            try:
                return self.parent.recv()
            except (EOFError, OSError):
                pass
        else:
            self.kill()
            return ("hang", f"no answer in {timeout:.0f} s", timeout, [])
        self.proc.join(5)
        code = self.proc.exitcode
        return ("signal", f"worker died, exit code {code}", 0.0, [])

    def kill(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)

    def close(self):
        try:
            self.parent.send(None)
        except OSError:
            pass
        self.proc.join(5)
        self.kill()


# ---- seeds ----------------------------------------------------------------------------------------
def _save(tensors, path, metadata=None):
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    return path


def make_seeds(root: Path) -> list[Path]:
    """Real adapter files of every layout the reader accepts (small ranks and few modules: kB each)."""
    import numpy as np
    import torch

    from lorasearch.adapters.writers import random_adapter, write_adapter

    root.mkdir(parents=True, exist_ok=True)
    seeds: list[Path] = []
    sd_t = r"(down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn[12]\.to_[qkv]|text_model\.encoder\.layers\.0\.self_attn\.q_proj)$"
    sd = random_adapter("sd15", rank=2, targets=sd_t, seed=1, alpha=1, dtype="float16")
    xl = random_adapter("sdxl", rank=2, targets=r"(down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k|"
                        r"text_encoder_2\.text_model\.encoder\.layers\.0\.self_attn\.v_proj)$", seed=2, dtype="float16")
    ml = random_adapter("minilm", rank=2, targets=r"layer\.[01]\.attention\.self\.(query|value)$", seed=3, alpha=4)
    ml.modules[0].scale = 8 / 2        # another alpha on one module: rank/alpha patterns in the config
    tags = json.dumps({"10_x": {"x": 4, "1girl": 2}})
    for fmt in ("kohya", "diffusers", "diffusers-mid", "diffusers-old", "peft-file"):
        seeds.append(write_adapter(sd, root / f"sd15_{fmt}.safetensors", fmt,
                                   metadata={"ss_tag_frequency": tags, "modelspec.title": "t"} if fmt == "kohya" else None))
    seeds.append(write_adapter(xl, root / "sdxl_kohya.safetensors", "kohya"))
    seeds.append(write_adapter(xl, root / "sdxl_diffusers.safetensors", "diffusers", config_extra={"use_rslora": False}))
    seeds.append(write_adapter(ml, root / "minilm_peft", "peft"))
    seeds.append(write_adapter(ml, root / "minilm_peft_file.safetensors", "peft-file"))
    locon = random_adapter("sd15", rank=2, targets=r"down_blocks\.0\.resnets\.0\.conv1$", conv=True, seed=4,
                           dtype="float16")
    seeds.append(write_adapter(locon, root / "sd15_locon.safetensors", "kohya"))
    rng = np.random.default_rng(5)

    def t(*s, dt=torch.float16):
        return torch.from_numpy((rng.standard_normal(s) * 0.05).astype(np.float32)).to(dt)
    H, r = 3072, 2
    seeds.append(_save({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": t(r, H),
                        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": t(3 * H, r),
                        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0)},
                       root / "flux_kohya.safetensors", {"ss_base_model_version": "flux1"}))
    seeds.append(_save({"transformer_blocks.0.attn.to_q.lora_A.weight": t(r, H),
                        "transformer_blocks.0.attn.to_q.lora_B.weight": t(H, r)}, root / "flux_diffsynth.safetensors"))
    k = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    for name, dt in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn), ("fp8e5", torch.float8_e5m2),
                     ("f64", torch.float64)):
        seeds.append(_save({f"{k}.lora_down.weight": t(r, 768, dt=torch.float32).to(dt),
                            f"{k}.lora_up.weight": t(768, r, dt=torch.float32).to(dt),
                            f"{k}.alpha": torch.tensor(1.0, dtype=torch.float64)}, root / f"te_{name}.safetensors"))
    seeds.append(_save({f"{k}.hada_w1_a": t(r, 768), f"{k}.hada_w1_b": t(768, r)}, root / "loha.safetensors"))
    return seeds


# ---- mutations ------------------------------------------------------------------------------------
def split_file(raw: bytes):
    """(header dict or None, header bytes, data bytes) of a safetensors file."""
    if len(raw) < 8:
        return None, b"", raw
    n = struct.unpack("<Q", raw[:8])[0]
    hb, data = raw[8:8 + n], raw[8 + n:]
    try:
        return json.loads(hb), hb, data
    except (ValueError, RecursionError):
        return None, hb, data


def join_file(header, data: bytes, hb: bytes | None = None) -> bytes:
    hb = hb if hb is not None else json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def deep(rng, n=None):
    n = n or rng.choice([70, 999, 1001, 5000, 100_000])
    kind = rng.choice(["list", "dict", "mixed"])
    if kind == "list":
        return "[" * n + "]" * n
    if kind == "dict":
        return '{"a":' * n + "1" + "}" * n
    return '[{"a":' * (n // 2) + "1" + "}]" * (n // 2)


HOSTILE_PATTERNS = ["([a-z_0-9.]+)*!", "(a+)+$", "(.*)*x", r"(\w+\.?)+#", "((((.*)*)*)*)*z", r"(q)\1",
                    "(?=query)query", "(?<!x)value", "[unclosed", "a{1000}{1000}", "*", "", "(" * 500,
                    "x" * 5000, r"\Z", "(?P<n>a)(?P=n)"]
WEIRD_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "1" + "0" * 5000, "0", "-0",
                 "1e-400", '"8"', '"eight"', "null", "true", "[8]", '{"a":8}', '""', '"NaN"', '"1e400"']
DTYPES = ["F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "I8", "U8",
          "I64", "BOOL", "C64", "F4", "F6_E2M3", "f16", "", "F16 ", 16, None, ["F16"], {"F16": 1}, True, 1.5]


def _num(rng):
    return rng.choice(WEIRD_NUMBERS)


def mutate_header_json(rng, header: dict, data: bytes):
    """Edit the parsed header; returns (header-or-None, header bytes or None, data)."""
    keys = [k for k in header if k != "__metadata__"]
    op = rng.choice(["dtype", "shape", "offsets", "key", "meta", "meta_json", "entry", "dup", "raw_number",
                     "deep_header", "drop", "data"])
    if not keys:
        op = "meta"
    k = rng.choice(keys) if keys else None
    if op == "dtype":
        header[k]["dtype"] = rng.choice(DTYPES)
    elif op == "shape":
        header[k]["shape"] = rng.choice([[0], [0, 2 ** 62], [2 ** 62, 0], [2 ** 64], [-1, 4], [1.5, 2], ["2", 2],
                                         [True, 2], [], [1], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [[2], 2], None, "2x2",
                                         [2 ** 31, 2 ** 31], list(reversed(header[k]["shape"])),
                                         [0, 2 ** 63 - 1, 2 ** 63 - 1]])
    elif op == "offsets":
        a, b = header[k]["data_offsets"]
        header[k]["data_offsets"] = rng.choice([[b, a], [a, b + 1], [a - 1, b], [0, 2 ** 64], [-1, b], [a, a],
                                                [a + 0.5, b], None, [a], [str(a), b], [2 ** 63, 2 ** 63 + 2]])
    elif op == "key":
        new = rng.choice([k.replace("lora_down", "oft_R").replace("lora_A", "oft_R"), k + ".oft_R.weight",
                          k.replace(".weight", ".lokr_w1"), k.replace("lora_", "hada_"), "", " ", "\x00",
                          k.replace("lora_up", "lora_down").replace("lora_B", "lora_A"), "x" * 100_000,
                          "lora_te_encoder_layer_0_attention_self_query.lora_down.weight",
                          "base_model.model.0.model.encoder.layer.0.attention.self.query.lora_A.weight",
                          "transformer_blocks.0.attn.to_q.lora_A.weight", k + ".alpha", "é" * 10,
                          "lora_unet_" + "a_" * 20000 + "b.lora_down.weight", k.replace("lora_down", "lora_mid")])
        header[new] = header.pop(k)
    elif op in ("meta", "meta_json"):
        meta = header.setdefault("__metadata__", {})
        if not isinstance(meta, dict):
            meta = header["__metadata__"] = {}
        field = rng.choice(["ss_tag_frequency", "lora_adapter_metadata", "modelspec.architecture", "modelspec.title",
                            "ss_network_args", "ss_base_model_version", "modelspec.trigger_phrase", "ss_v2"])
        if op == "meta" and rng.random() < 0.3:
            meta[field] = rng.choice([1, None, [], {"a": "b"}, 1e400, True])       # not a string
        elif field == "ss_tag_frequency":
            meta[field] = rng.choice([deep(rng), '{"a": {"t": %s, "u": 2}}' % _num(rng), '{"a": [1, 2]}', "{", "[]",
                                      '{"a": {"%s": 1}}' % ("t" * 10000), '{"a": {"t": 1e308, "u": 1e308}}'])
        elif field == "lora_adapter_metadata":
            pat = json.dumps(rng.choice(HOSTILE_PATTERNS))
            meta[field] = rng.choice([deep(rng), '{"unet.lora_alpha": %s, "unet.r": 2}' % _num(rng),
                                      '{"lora_alpha": %s}' % _num(rng),
                                      '{"unet.alpha_pattern": {%s: 2}, "unet.lora_alpha": 4}' % pat,
                                      '{"text_encoder.alpha_pattern": %s}' % _num(rng),
                                      '{"unet.rank_pattern": {"x": %s}}' % _num(rng), '{"unet.use_rslora": %s}' % _num(rng),
                                      "{", "[1]", '"s"'])
        else:
            meta[field] = rng.choice([deep(rng), "x" * 1_000_000, "stable-diffusion-xl-v1-base", "flux-1-dev",
                                      "sd_v1", "True", "\x00", json.dumps({"algo": "lokr"})])
    elif op == "entry":
        header[k] = rng.choice([None, [], "x", 1, {"dtype": "F16"}, {**header[k], "extra": 1}, json.loads(deep(rng, 50))])
    elif op == "dup":
        hb = json.dumps(header)
        first = json.dumps({k: header[k]})[1:-1]
        return None, ("{" + first + ", " + hb[1:]).encode(), data
    elif op == "raw_number":
        hb = json.dumps(header)
        hb = re.sub(r"\d+", lambda m: _num(rng) if rng.random() < 0.2 else m.group(), hb)
        return None, hb.encode(), data
    elif op == "deep_header":
        hb = json.dumps(header)
        return None, (hb[:-1] + ', "zz": ' + deep(rng) + "}").encode(), data
    elif op == "drop":
        header.pop(k)
    else:      # tensor data: NaN / Inf / huge / denormal bytes over one tensor
        a, b = header[k]["data_offsets"]
        fill = rng.choice([b"\xff\xff", b"\x00\x7c", b"\x7f\x7f", b"\xff\x7f\x00\x00", b"\x00\x00\x80\x7f", b"\x01\x00"])
        body = (fill * ((b - a) // len(fill) + 1))[: b - a]
        data = data[:a] + body + data[b:]
    return header, None, data


def mutate_bytes(rng, raw: bytes, header_len: int) -> bytes:
    op = rng.choice(["flip", "flip_header", "truncate", "length_lie", "append", "splice", "zero"])
    b = bytearray(raw)
    if op in ("flip", "flip_header") and b:
        hi = min(len(b), 8 + header_len) if op == "flip_header" else len(b)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(hi)
            b[i] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        b = b[: rng.randrange(len(b) + 1)]
    elif op == "length_lie":
        n = struct.unpack("<Q", bytes(b[:8]))[0] if len(b) >= 8 else 0
        lie = rng.choice([0, 1, n - 1, n + 1, n + 8, len(b), 2 ** 64 - 1, 2 ** 63, 99_999_999, 100_000_001, n * 2])
        b[:8] = struct.pack("<Q", max(0, lie) % 2 ** 64)
    elif op == "append":
        b += rng.choice([b"\0", b"junk", rng.randbytes(rng.randint(1, 4096))])
    elif op == "splice":
        i = rng.randrange(len(b) + 1)
        b = b[:i] + rng.randbytes(rng.randint(1, 64)) + b[i:]
    else:
        i = rng.randrange(len(b) + 1)
        b[i:i + rng.randint(1, 256)] = b"\0" * rng.randint(1, 256)
    return bytes(b)


_R = random.Random(0)     # fixed foreign contents: runs are reproducible from --seed
FOREIGN = {
    "pickle": b"\x80\x04\x95" + _R.randbytes(64), "zip": b"PK\x03\x04" + _R.randbytes(200), "gguf": b"GGUF\x03\x00\x00\x00" + _R.randbytes(64),
    "html": b"<!DOCTYPE html><html><body>Not found</body></html>", "json": b'{"peft_type": "LORA"}',
    "elf": b"\x7fELF\x02\x01\x01" + _R.randbytes(200), "gzip": b"\x1f\x8b\x08" + _R.randbytes(100), "empty": b"",
    "text": b"root:x:0:0:root:/root:/bin/bash\n", "one_byte": b"{", "eight_zero": b"\0" * 8,
    "random": _R.randbytes(4096), "header_only": struct.pack("<Q", 2) + b"{}", "nul_header": struct.pack("<Q", 4) + b"\0\0\0\0",
}


def mutate_config(rng, cfg_text: str) -> str:
    try:
        cfg = json.loads(cfg_text)
    except ValueError:
        cfg = {}
    op = rng.choice(["alpha", "alpha_pattern", "rank_pattern", "peft_type", "deep", "broken", "rslora", "types"])
    if op == "alpha":
        return json.dumps(cfg)[:-1] + ', "lora_alpha": %s}' % _num(rng)
    if op == "alpha_pattern":
        pat = json.dumps(rng.choice(HOSTILE_PATTERNS + ["query", "layer.0.attention.self.value"]))
        return json.dumps(cfg)[:-1] + ', "alpha_pattern": %s}' % rng.choice(
            ["{%s: %s}" % (pat, _num(rng)), "{%s: 2}" % pat, _num(rng), '["query"]', deep(rng)])
    if op == "rank_pattern":
        return json.dumps(cfg)[:-1] + ', "rank_pattern": %s}' % rng.choice(["{\"query\": %s}" % _num(rng), _num(rng)])
    if op == "peft_type":
        cfg["peft_type"] = rng.choice(["LOHA", "OFT", None, 1, ["LORA"], "lora", "x" * 10000])
        return json.dumps(cfg)
    if op == "deep":
        return deep(rng) if rng.random() < 0.5 else json.dumps(cfg)[:-1] + ', "x": ' + deep(rng) + "}"
    if op == "broken":
        return rng.choice(["", "{", "[]", "null", "\xff\xfe", cfg_text[: len(cfg_text) // 2], "NaN"])
    if op == "rslora":
        cfg["use_rslora"] = rng.choice([True, "yes", None, [], {"a": 1}, 1e400])
        return json.dumps(cfg)
    cfg[rng.choice(["r", "target_modules", "modules_to_save", "use_dora"])] = rng.choice([None, [], {}, "x", 1e400, -1])
    return json.dumps(cfg)


def make_mutant(rng, seeds: list[Path], out: Path) -> tuple[Path, str]:
    """One mutated file (or folder, or special file) at ``out``; returns (path, what was done)."""
    roll = rng.random()
    if roll < 0.04:
        kind = rng.choice(sorted(FOREIGN))
        out.write_bytes(FOREIGN[kind])
        return out, f"foreign:{kind}"
    if roll < 0.05:
        return special(rng, out)
    seed = rng.choice(seeds)
    if seed.is_dir():
        shutil.copytree(seed, out)
        cfg, weights = out / "adapter_config.json", out / "adapter_model.safetensors"
        if rng.random() < 0.5:
            cfg.write_text(mutate_config(rng, cfg.read_text()), encoding="utf-8", errors="surrogateescape")
            return out, f"{seed.name}:config"
        target, label = weights, f"{seed.name}:weights"
    else:
        target, label = out, seed.name
    raw = seed.read_bytes() if not seed.is_dir() else (seed / "adapter_model.safetensors").read_bytes()
    ops = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        header, hb, data = split_file(raw)
        if header is not None and isinstance(header, dict) and rng.random() < 0.6:
            try:
                header, new_hb, data = mutate_header_json(rng, header, data)
                raw = join_file(header, data, new_hb)
            except (ValueError, TypeError, KeyError, RecursionError, AttributeError, OverflowError):
                raw = mutate_bytes(rng, raw, len(hb))     # this seed's header does not take that edit
            ops.append("json")
        else:
            raw = mutate_bytes(rng, raw, len(hb))
            ops.append("bytes")
    target.write_bytes(raw)
    return out, f"{label}:{'+'.join(ops)}"


def special(rng, out: Path) -> tuple[Path, str]:
    kind = rng.choice(["fifo", "socket", "dangling", "loop", "dir", "devzero", "devnull"])
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(out))
        except OSError:      # path too long for AF_UNIX: use a FIFO instead
            os.mkfifo(out)
            kind = "fifo"
        finally:
            s.close()
    elif kind == "dangling":
        out.symlink_to(out.parent / "nowhere")
    elif kind == "loop":
        out.symlink_to(out)
    elif kind == "dir":
        out.mkdir()
    elif kind == "devzero":
        out.symlink_to("/dev/zero")
    else:
        out.symlink_to("/dev/null")
    return out, f"special:{kind}"


# ---- driver ---------------------------------------------------------------------------------------
def reason_of(msg: str, path: str) -> str:
    """A refusal message with the path, names and numbers taken out, so equal reasons count together."""
    msg = msg.replace(path, "")
    msg = re.sub(r"^\S*/\S+?: ", "", msg).lstrip(": ")           # the weights file of a PEFT folder
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", msg)
    msg = re.sub(r"\[[^\]]*\]?", "[…]", msg)
    msg = re.sub(r"\{[^}]*\}?", "{…}", msg)
    msg = re.sub(r"\([^)]*\)?", "(…)", msg)
    msg = re.sub(r"(?<![\w-])-?\d+(\.\d+)?(e[+-]?\d+)?", "N", msg)
    return msg.split(";")[0].strip()[:100]


def run(n_files: int, workers: int, timeout: float, seed: int, workdir: Path | None = None) -> dict:
    ctx = mp.get_context("forkserver" if sys.platform != "win32" else "spawn")
    rng = random.Random(seed)
    base = Path(workdir or tempfile.mkdtemp(prefix="lorasearch-fuzz-"))
    seeds = make_seeds(base / "seeds")
    pool = [Worker(ctx) for _ in range(workers)]
    outcomes, reasons, others, hangs, signals = Counter(), Counter(), [], [], []
    by_source: dict[str, Counter] = {}
    warned, slowest = [], (0.0, "")
    t0 = time.time()
    try:
        for i in range(n_files):
            w = pool[i % workers]
            out = base / "cases" / f"{i:06d}.safetensors"
            out.parent.mkdir(exist_ok=True)
            try:
                path, what = make_mutant(rng, seeds, out)
            except Exception as e:       # noqa: BLE001 - a bug of the fuzzer's own mutators, not of the reader
                print(f"case {i}: could not create ({e}); skipped", file=sys.stderr)
                continue
            outcome, msg, secs, warns = w.run(str(path), timeout)
            if outcome in ("hang", "signal"):
                pool[i % workers] = Worker(ctx)
            outcomes[outcome] += 1
            src = what.split(":")[0]
            by_source.setdefault(src, Counter())[outcome] += 1
            if secs > slowest[0]:
                slowest = (secs, what)
            if outcome == "refused":
                reasons[reason_of(msg, str(path))] += 1
            elif outcome in ("other", "hang", "signal"):
                keep = base / "findings" / f"{i:06d}_{outcome}"
                keep.parent.mkdir(exist_ok=True)
                _keep(path, keep)
                (others if outcome == "other" else hangs if outcome == "hang" else signals).append(
                    {"case": i, "what": what, "message": msg, "kept": str(keep)})
            if warns:
                warned.append({"case": i, "what": what, "warnings": warns[:3]})
            _remove(path)
            if (i + 1) % 1000 == 0:
                print(f"{i + 1} files, {dict(outcomes)}, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        for w in pool:
            w.close()
    return {"files": sum(outcomes.values()), "outcomes": {k: outcomes.get(k, 0) for k in OUTCOMES},
            "refusal_reasons": dict(reasons.most_common()), "other": others, "hangs": hangs, "signals": signals,
            "python_warnings": warned, "by_source": {k: dict(v) for k, v in sorted(by_source.items())},
            "slowest_s": round(slowest[0], 3), "slowest_case": slowest[1], "seconds": round(time.time() - t0, 1),
            "timeout_s": timeout, "workers": workers, "seed": seed, "seeds": [p.name for p in seeds],
            "workdir": str(base)}


def _keep(path: Path, dest: Path) -> None:
    try:
        if path.is_symlink():
            dest.with_suffix(".symlink").write_text(os.readlink(path))
        elif path.is_dir():
            shutil.copytree(path, dest)
        elif path.is_file():
            shutil.copy(path, dest)
        else:
            dest.with_suffix(".special").write_text("special file")
    except OSError:
        pass


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = ap.parse_args(argv)
    res = run(args.files, args.workers, args.timeout, args.seed)
    text = json.dumps(res, indent=1, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(json.dumps({k: res[k] for k in ("files", "outcomes", "slowest_s", "seconds")}))
    shutil.rmtree(Path(res["workdir"]) / "seeds", ignore_errors=True)
    bad = res["outcomes"]["other"] + res["outcomes"]["hang"] + res["outcomes"]["signal"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""The default encoder straight from the factors (``SketchEncoder.embed``): the same vectors as the
canonical path, the same as ``main``'s torch code (so its version is kept), deterministic across
processes; and ``--device`` reaching the encoder through ``get_encoder``."""
import subprocess
import sys

import numpy as np
import pytest

from lorasearch.adapters.writers import quantize, random_adapter
from lorasearch.canonical import canonicalize_many
from lorasearch.devices import parse_device, resolve_device
from lorasearch.encoders import get_encoder
from lorasearch.encoders.sketch import SketchEncoder
from lorasearch.errors import UnavailableError, UsageError
from lorasearch.similarity import delta_norm
from lorasearch.types import LoraAdapter, LoraModule

TARGETS = r"layer\.[0-2]\..*(query|value|intermediate)"
SD_SUBSET = r"down_blocks\.0|mid_block|text_model\.encoder\.layers\.0\."


def reparam(ad, seed):
    rng = np.random.default_rng(seed)
    mods = []
    for m in ad.modules:
        G = rng.standard_normal((m.rank, m.rank)) / np.sqrt(m.rank) + 2 * np.eye(m.rank)
        mods.append(LoraModule(m.name, (np.linalg.inv(G) @ m.A).astype(np.float32), (m.B @ G).astype(np.float32),
                               m.scale, "F32", m.shape, m.alpha))
    return LoraAdapter("g", "memory", "", ad.family, mods)


def canonical_path(enc, ads):
    canon = canonicalize_many(ads, device="cpu")
    norms = [float(np.sqrt(sum(float(np.sum(np.asarray(m.sigma, np.float64) ** 2)) for m in c.modules))) for c in canon]
    return enc.encode(canon), norms


CASES = [("sd15", 1, "float16", None, "unit"), ("sd15", 8, "bfloat16", None, "raw"),
         ("sd15", 32, "float16", None, "unit"), ("sd15", 64, "float32", SD_SUBSET, "raw"),
         ("minilm", 1, "float32", None, "raw"), ("minilm", 16, "bfloat16", None, "unit"),
         ("minilm", 64, "float16", None, "raw"), ("minilm", 8, "float16", None, "unit")]


@pytest.mark.parametrize("arch,rank,dtype,targets,weighting", CASES)
def test_factor_path_equals_canonical_path(arch, rank, dtype, targets, weighting):
    enc = SketchEncoder(weighting=weighting)
    ads = [random_adapter(arch, rank=rank, seed=s, dtype=dtype, targets=targets) for s in (1, 2)]
    ads.append(reparam(ads[0], 7))                   # a GL(r)-reparameterized copy of the first
    got, norms = enc.embed(ads, device="cpu")
    ref, ref_norms = canonical_path(enc, ads)
    assert got.dtype == np.float32 and got.shape == (3, 1024)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert np.abs(got - ref).max() < 5e-7            # float32 rounding
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
    np.testing.assert_allclose(norms[:2], [delta_norm(a) for a in ads[:2]], rtol=1e-5)
    assert np.abs(got[0] - got[2]).max() < 5e-6      # the reparameterized copy embeds alike


# Vectors produced by ``main``'s torch implementation (canonicalize + SketchEncoder.encode, sketch
# version 2) before the rewrite: if these move, the vectors changed and SketchEncoder.version
# must be bumped (indexes record it).
GOLDEN = [
    (("minilm", 8, 1, "float32", TARGETS), [-0.015347819, -0.028962573, 0.029694382, 0.01984728, 0.06344878,
                                             -0.011074075], 1.1193112059591366),
    (("sd15", 4, 3, "float16", None), [0.000500524, -0.002760284, -0.022580834, -0.004443493, -0.022610482,
                                       -0.028936833], -0.6430131078627805),
]


@pytest.mark.parametrize("args,head,probe", GOLDEN)
def test_vectors_unchanged_from_the_torch_implementation(args, head, probe):
    arch, rank, seed, dtype, targets = args
    e = SketchEncoder().embed([random_adapter(arch, rank=rank, seed=seed, dtype=dtype, targets=targets)])[0][0]
    assert SketchEncoder.version == "2"
    np.testing.assert_allclose(e[:6], head, atol=3e-7)
    assert float(e @ np.cos(np.arange(1024))) == pytest.approx(probe, abs=2e-5)


def test_embed_is_the_same_in_a_fresh_process():
    ad = random_adapter("minilm", rank=8, seed=1, targets=TARGETS)
    e1 = SketchEncoder().embed([ad])[0]
    code = ("import sys;from lorasearch.adapters.writers import random_adapter;"
            "from lorasearch.encoders import get_encoder;"
            f"ad=random_adapter('minilm',rank=8,seed=1,targets={TARGETS!r});"
            "sys.stdout.write(get_encoder('sketch').embed([ad])[0].tobytes().hex())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "4321", "PATH": ""}).stdout
    assert np.frombuffer(bytes.fromhex(other), np.float32).tolist() == e1[0].tolist()


def test_one_thread_and_many_threads_agree():
    ads = [random_adapter("minilm", rank=4, seed=s) for s in range(5)]
    one, many = SketchEncoder(), SketchEncoder()
    one.workers, many.workers = 1, 4
    a, na = one.embed(ads)
    b, nb = many.embed(ads)
    assert a.tolist() == b.tolist() and na == nb


def test_zero_modules_and_empty_input():
    ad = random_adapter("minilm", rank=4, seed=1, targets=TARGETS)
    zero = LoraAdapter("z", "memory", "", ad.family,
                       [LoraModule(m.name, m.A, np.zeros_like(m.B), m.scale, shape=m.shape) for m in ad.modules])
    half = LoraAdapter("h", "memory", "", ad.family, zero.modules[:2] + ad.modules[2:])
    v, n = SketchEncoder().embed([zero, half, ad])
    assert not v[0].any() and n[0] == 0.0
    ref, _ = canonical_path(SketchEncoder(), [half])
    assert np.abs(v[1] - ref[0]).max() < 5e-7
    v, n = SketchEncoder().embed([])
    assert v.shape == (0, 1024) and n == []


def test_fp16_factors_are_accepted_as_is():
    ad = random_adapter("minilm", rank=8, seed=4, dtype="float16")
    h = LoraAdapter("h", "memory", "", ad.family,
                    [LoraModule(m.name, m.A.astype(np.float16), m.B.astype(np.float16), m.scale, "F16", m.shape)
                     for m in ad.modules])
    assert np.abs(SketchEncoder().embed([h])[0] - SketchEncoder().embed([ad])[0]).max() < 1e-7


def test_device_reaches_the_encoder():
    enc = get_encoder("w2t:minilm", device="cpu")
    assert str(enc.device) == "cpu"
    if resolve_device("auto") == "cpu":
        with pytest.raises(UnavailableError):
            get_encoder("w2t:minilm", device="cuda")
    assert get_encoder("sketch", device="cpu").device == "cpu"


def test_parse_device():
    assert parse_device("cuda:1") == ("cuda", 1) and parse_device(None) == ("auto", None)
    assert resolve_device("cpu") == "cpu"
    for bad in ("gpu", "cuda:x", "cuda:-1", ""):
        with pytest.raises(UsageError):
            parse_device(bad)


def test_cpu_and_numpy_auto_do_not_import_torch():
    code = ("import sys;from lorasearch.devices import resolve_device;"
            "from lorasearch.encoders import get_encoder;"
            "assert resolve_device('cpu')=='cpu' and resolve_device('auto', torch_ok=False)=='cpu';"
            "get_encoder('sketch');print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_overflowing_factors_are_a_bad_adapter_not_nan():
    from lorasearch.errors import BadAdapterError

    ad = random_adapter("minilm", rank=4, seed=1, targets=TARGETS)
    m = ad.modules[0]
    big = LoraAdapter("huge.safetensors", "memory", "", ad.family,
                      [LoraModule(m.name, m.A * np.float32(1e20), m.B * np.float32(1e20), m.scale, shape=m.shape)]
                      + ad.modules[1:])
    with pytest.raises(BadAdapterError, match="huge.safetensors.*overflows float32"):
        SketchEncoder().embed([big])

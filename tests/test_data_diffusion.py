"""The diffusion suite: image hierarchy, stacked LoRA training, collection files and manifest."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lorasearch.data import diffusion_base as DB
from lorasearch.data import images as I
from lorasearch.data.diffusion_lora import Job, train_jobs

SMALL_UNET = dict(DB.UNET_CONFIG, block_out_channels=(16, 16, 16), norm_num_groups=8, attention_head_dim=8)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_image_hierarchy_is_real_and_deterministic():
    ls = I.leaves()
    assert len(ls) == 200 and len({l.name for l in ls}) == 200
    assert [sum(l.superclass == s for l in ls) for s in I.SUPERCLASSES] == [20] * 10
    a, b = I.leaf_images(ls[37], 5, seed=3), I.leaf_images(ls[37], 5, seed=3)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, I.leaf_images(ls[37], 5, seed=4))
    assert not np.allclose(a[0], a[1])            # images of one leaf vary
    # leaves are visually distinct: the nearest leaf centroid of a translation-invariant feature
    # (log FFT magnitude per channel) recovers the leaf and the superclass of fresh images
    feat = lambda x: np.log1p(np.abs(np.fft.fft2(x.transpose(0, 3, 1, 2)))).reshape(len(x), -1)  # noqa: E731
    train = np.stack([feat(I.leaf_images(l, 6, seed=0)).mean(0) for l in ls])
    test, ids = I.image_set(1, seed=99)
    pred = ((feat(test)[:, None, :] - train[None]) ** 2).sum(-1).argmin(1)
    assert (pred // 20 == ids // 20).mean() > 0.85   # superclass (chance 0.1)
    assert (pred == ids).mean() > 0.6                # leaf (chance 0.005)


def _jobs(k: int, steps_seed: int = 0):
    ls = I.leaves()
    return [Job(leaf=ls[20 * i + 3], images=I.leaf_images(ls[20 * i + 3], 4, seed=i), seed=100 + i,
                rank=(1, 4)[i % 2], alpha=(1.0, 4.0)[i % 2], lr=1e-2) for i in range(k)]


def test_stacked_training_matches_training_alone():
    torch.manual_seed(0)
    base = DB.build_unet(SMALL_UNET).eval()
    base.requires_grad_(False)
    together = _jobs(2)
    ml = train_jobs(copy.deepcopy(base), together, steps=3, batch=2, log_every=1)
    for i in range(2):
        alone = _jobs(2)[i:i + 1]
        ml1 = train_jobs(copy.deepcopy(base), alone, steps=3, batch=2, log_every=1)
        np.testing.assert_allclose(alone[0].result["loss_curve"], together[i].result["loss_curve"], rtol=1e-4)
        f, f1 = ml.factors(i), ml1.factors(0)
        assert len(f) == 28
        for name in f:
            # float summation order differs with the batch size; Adam's normalization amplifies it a little
            np.testing.assert_allclose(f[name][1].numpy(), f1[name][1].numpy(), rtol=1e-3, atol=1e-5)
            assert float(f[name][1].abs().max()) > 0    # B moved off its zero init


@pytest.fixture(scope="module")
def tiny_collection(tmp_path_factory):
    if not (DB.BASE_DIR / "config.json").exists():
        pytest.skip("no committed diffusion base under data/base/")
    from lorasearch.data.diffusion import make_collection
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("diffusion")
    return out, make_collection(str(out), n=4, seed=0, device="cpu", tiny=True, log=lambda *_: None)


def test_tiny_collection_files_and_manifest(tiny_collection):
    from lorasearch.adapters import load_adapter
    from lorasearch.data.manifest import read_manifest
    from safetensors import safe_open
    out, manifest = tiny_collection
    rows = read_manifest(manifest)
    assert len(rows) == 4 and {r["suite"] for r in rows} == {"diffusion"}
    assert {r["format"] for r in rows} == {"diffusers", "kohya"} and {r["rank"] for r in rows} == {1, 4}
    assert {r["role"] for r in rows} == {"gallery", "query"}
    for r in rows:
        assert r["label"] == r["superclass"] and r["leaf"] in {l.name for l in I.leaves()}
        assert r["hyperparameters"]["prompt"] == f"a photo of sks {r['superclass']}"
        assert len(r["loss_curve"]) >= 1 and r["test_loss"] > 0
        ad = load_adapter(out / r["path"])
        assert ad.format == r["format"] and ad.family == "sd-ctx384" and len(ad.modules) == 28
        assert {m.rank for m in ad.modules} == {r["rank"]} and not ad.unknown_keys
        assert all(m.name.startswith("unet.") and m.name.endswith(("to_q", "to_v")) for m in ad.modules)
        with safe_open(str(out / r["path"]), "pt") as f:
            keys = list(f.keys())
            assert all(f.get_tensor(k).dtype == torch.float16 for k in keys if not k.endswith(".alpha"))
        want = ".lora_A.weight" if r["format"] == "diffusers" else ".lora_down.weight"
        assert any(k.endswith(want) for k in keys)
        assert all(k.startswith("unet." if r["format"] == "diffusers" else "lora_unet_") for k in keys)


def test_lora_training_lowers_its_loss():
    """A few steps of one adapter on the committed base lower the fixed-noise loss on its own images."""
    if not (DB.BASE_DIR / "config.json").exists():
        pytest.skip("no committed diffusion base under data/base/")
    ls = I.leaves()
    job = Job(leaf=ls[45], images=I.leaf_images(ls[45], 4, seed=1), seed=7, lr=1e-2)
    train_jobs(DB.load_base(), [job], steps=15, batch=4)
    r = job.result
    assert r["eval_images_after"] < r["eval_images_before"]


def test_sampling_with_routed_adapters_and_cuda_refusal(tmp_path):
    from lorasearch.data.diffusion import make_collection
    from lorasearch.data.diffusion_lora import routed
    from lorasearch.errors import UnavailableError
    base = DB.build_unet(SMALL_UNET).eval()
    jobs = _jobs(2)
    ml = train_jobs(copy.deepcopy(base), jobs, steps=1, batch=1)
    cond = DB.embed_prompts([DB.sks_prompt(j.leaf) for j in jobs])
    x = DB.sample(routed(ml, torch.arange(2)), cond, steps=2, guidance=2.0)
    assert x.shape == (2, 32, 32, 3) and x.min() >= 0 and x.max() <= 1
    if not torch.cuda.is_available():
        with pytest.raises(UnavailableError):
            make_collection(str(tmp_path), n=1, seed=0, device="cuda", tiny=True)

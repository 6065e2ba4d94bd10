"""Batched multi-LoRA training equals training each adapter alone (and a plain peft loop)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
from transformers import BertConfig, BertModel  # noqa: E402

from lorasearch.data import language as lang  # noqa: E402
from lorasearch.data.multilora import MultiLora, clip_grad_norm_per_adapter_  # noqa: E402

torch.set_num_threads(1)


def tiny_base(device="cpu"):
    torch.manual_seed(123)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    m = BertModel(cfg, add_pooling_layer=False)
    m.requires_grad_(False)
    return m.to(device)


def tiny_data(seed: int, n_labels: int, n: int = 24) -> lang.TaskData:
    """Random token sequences of varying length; the label is a function of the first token."""
    g = torch.Generator().manual_seed(seed)

    def make(k):
        L = 9
        ids = torch.randint(5, 60, (k, L), generator=g)
        lens = torch.randint(4, L + 1, (k,), generator=g)
        mask = (torch.arange(L)[None] < lens[:, None]).long()
        ids = ids * mask
        return ids, mask, ids[:, 0] % n_labels

    a, b, c = make(n)
    d, e, f = make(12)
    return lang.TaskData(f"t{seed}", n_labels, a, b, c, d, e, f)


SPECS = [lang.RunSpec("t0", rank=2, alpha=4.0, lr=5e-3, steps=7, seed=11, batch_size=5),
         lang.RunSpec("t1", rank=4, alpha=4.0, lr=1e-2, steps=5, seed=22, batch_size=4),
         lang.RunSpec("t2", rank=8, alpha=16.0, lr=2e-3, steps=6, seed=33, batch_size=6)]
DATA = [tiny_data(0, 2), tiny_data(1, 3), tiny_data(2, 4)]


def _close(r1, r2, tol=2e-5):
    assert len(r1.loss_curve) == len(r2.loss_curve) == r1.spec.steps
    torch.testing.assert_close(torch.tensor(r1.loss_curve), torch.tensor(r2.loss_curve), atol=tol, rtol=tol)
    assert r1.factors.keys() == r2.factors.keys()
    for k in r1.factors:
        for x, y in zip(r1.factors[k], r2.factors[k]):
            torch.testing.assert_close(x, y, atol=tol, rtol=1e-4)
    torch.testing.assert_close(r1.head["weight"], r2.head["weight"], atol=tol, rtol=1e-4)
    assert r1.accuracy == pytest.approx(r2.accuracy)


@pytest.fixture(scope="module")
def batched():
    return lang.train_batched(SPECS, DATA, base_factory=tiny_base, micro_batch=None)


def test_batched_equals_each_alone(batched):
    for spec, data, res in zip(SPECS, DATA, batched):
        alone = lang.train_batched([spec], [data], base_factory=tiny_base)[0]
        _close(res, alone)
        assert res.loss_curve[-1] < res.loss_curve[0]   # it learned something
        B = next(iter(res.factors.values()))[1]
        assert B.abs().sum() > 0


def test_length_sorted_micro_batches_equal_one_pass(batched):
    for a, b in zip(lang.train_batched(SPECS, DATA, base_factory=tiny_base, micro_batch=4), batched):
        _close(a, b)


def test_batched_equals_plain_peft_loop(batched):
    for spec, data, res in zip(SPECS, DATA, batched):
        ref = lang.train_peft(spec, data, shared_init=True, base_factory=tiny_base)
        _close(res, ref)


def test_per_adapter_clipping_matches_peft_loop():
    specs = [lang.RunSpec("t0", rank=2, alpha=4.0, lr=5e-3, steps=4, seed=5, batch_size=5),
             lang.RunSpec("t1", rank=4, alpha=8.0, lr=1e-2, steps=4, seed=6, batch_size=4)]
    res = lang.train_batched(specs, DATA[:2], clip=0.05, base_factory=tiny_base)
    for spec, data, r in zip(specs, DATA[:2], res):
        _close(r, lang.train_peft(spec, data, shared_init=True, base_factory=tiny_base, clip=0.05))


def test_clip_per_adapter_equals_clip_alone():
    g = torch.Generator().manual_seed(0)
    p1 = torch.nn.Parameter(torch.zeros(3, 4, 5)); p1.grad = torch.randn(3, 4, 5, generator=g)
    p2 = torch.nn.Parameter(torch.zeros(3, 6)); p2.grad = torch.randn(3, 6, generator=g) * 10
    singles = []
    for i in range(3):
        a = torch.nn.Parameter(torch.zeros(4, 5)); a.grad = p1.grad[i].clone()
        b = torch.nn.Parameter(torch.zeros(6)); b.grad = p2.grad[i].clone()
        torch.nn.utils.clip_grad_norm_([a, b], 1.5)
        singles.append((a.grad, b.grad))
    clip_grad_norm_per_adapter_([p1, p2], 1.5)
    for i, (a, b) in enumerate(singles):
        torch.testing.assert_close(p1.grad[i], a)
        torch.testing.assert_close(p2.grad[i], b)


def test_padded_ranks_stay_exactly_zero():
    specs = [lang.RunSpec("t0", rank=2, alpha=2.0, lr=1e-2, steps=5, seed=1, batch_size=4),
             lang.RunSpec("t1", rank=8, alpha=8.0, lr=1e-2, steps=5, seed=2, batch_size=4)]
    base = tiny_base()
    ml = MultiLora(base, 2, [2, 8], [2.0, 8.0], lang.is_target, seeds=[1, 2])
    opt = torch.optim.AdamW(ml.lora_parameters(), lr=1e-2, weight_decay=0.1)
    d = DATA[0]
    for _ in range(5):
        route = torch.arange(8) % 2
        out = ml(route=route, input_ids=d.train_ids[:8], attention_mask=d.train_mask[:8]).last_hidden_state
        out.pow(2).mean().backward()
        opt.step(); opt.zero_grad()
    for _, layer in ml.layers():
        assert torch.count_nonzero(layer.A[0, 2:]) == 0 and torch.count_nonzero(layer.B[0, :, 2:]) == 0
        assert torch.count_nonzero(layer.B[0, :, :2]) > 0
    assert specs  # ranks above


def test_saved_peft_folder_reproduces_outputs(tmp_path, batched):
    """The folder written from the stacked weights loads with peft and gives the same outputs."""
    from peft import PeftModel

    spec = SPECS[1]
    ml = MultiLora(tiny_base(), 3, [s.rank for s in SPECS], [s.alpha for s in SPECS], lang.is_target,
                   seeds=[s.seed for s in SPECS])
    for i, r in enumerate(batched):
        ml.set_factors(i, r.factors)
    ml.save_peft(1, tmp_path / "a1", dtype="fp32", base_id="tiny")
    cfg = json.loads((tmp_path / "a1" / "adapter_config.json").read_text())
    assert cfg["r"] == spec.rank and cfg["lora_alpha"] == spec.alpha and cfg["peft_type"] == "LORA"
    assert cfg["target_modules"] == ["query", "value"]
    pm = PeftModel.from_pretrained(tiny_base(), tmp_path / "a1")
    d = DATA[1]
    with torch.no_grad():
        want = ml(route=torch.full((12,), 1), input_ids=d.test_ids, attention_mask=d.test_mask).last_hidden_state
        got = pm(input_ids=d.test_ids, attention_mask=d.test_mask).last_hidden_state
        plain = tiny_base()(input_ids=d.test_ids, attention_mask=d.test_mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, want, atol=1e-4)
    ad = ml.extract(1, family="bert")
    assert len(ad.modules) == 4 and ad.modules[0].rank == spec.rank
    assert ad.modules[0].scale == pytest.approx(spec.alpha / spec.rank)


@pytest.mark.slow
def test_batched_equals_peft_on_minilm():
    """The same check on the real base model (all-MiniLM-L6-v2, 12 targeted modules)."""
    from lorasearch.data.tasks import get_task

    specs = [lang.RunSpec("sentiment", rank=4, alpha=8.0, lr=1e-3, steps=3, seed=1, batch_size=4, n_train=16),
             lang.RunSpec("language", rank=8, alpha=8.0, lr=2e-3, steps=2, seed=2, batch_size=4, n_train=16)]
    datas = [lang.task_data(get_task(s.task), 0, s.n_train, 8) for s in specs]
    for res, s, d in zip(lang.train_batched(specs, datas), specs, datas):
        assert len(res.factors) == 12
        _close(res, lang.train_peft(s, d, shared_init=True), tol=1e-4)

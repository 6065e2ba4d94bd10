"""Train many LoRA adapters at once on one frozen base model.

Every targeted ``nn.Linear`` is wrapped so that it holds the factors of all ``n`` adapters stacked,
``A [n, r_max, in]`` and ``B [n, out, r_max]``, and every sample of a batch is routed to its own
adapter by an index tensor: ``y = W x + scale[i] · B[i] A[i] x``. Adapters of lower rank are
zero-padded to ``r_max``; the padded rows of A and columns of B start at zero and their
gradients are exactly zero (each one's gradient is a product with the other), so they stay zero.

Why this is equal to training each adapter alone: the per-adapter loss is the mean over that
adapter's own samples and the total loss is their sum, so adapter i's gradient is exactly its own;
AdamW is elementwise, and ``StackedAdamW`` gives every adapter its own learning rate, weight decay,
step count and on/off flag; gradient clipping (optional) is per adapter. Hand-written because
peft wraps one adapter per forward pass and ``torch.optim.AdamW`` has one learning rate per tensor.

    ml = MultiLora(base, n=8, ranks=[4]*4+[8]*4, alphas=[8.]*8, target=is_target, seeds=range(8))
    y = ml(route=idx, input_ids=..., attention_mask=...)        # idx: [batch] adapter per sample
    ml.save_peft(3, "out/adapter-3")                             # a real PEFT folder
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from lorasearch.types import LoraAdapter, LoraModule


class _Route:
    """Holds the per-sample adapter index for the duration of one forward pass."""

    idx: torch.Tensor | None = None


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, ranks: Sequence[int], alphas: Sequence[float],
                 dropout: Sequence[float], route: _Route, rslora: bool = False):
        super().__init__()
        n, r_max = len(ranks), max(ranks)
        self.base = base
        self.route = route
        dev = base.weight.device
        self.A = nn.Parameter(torch.zeros(n, r_max, base.in_features, device=dev))
        self.B = nn.Parameter(torch.zeros(n, base.out_features, r_max, device=dev))
        r = torch.tensor(ranks, dtype=torch.float32)
        self.register_buffer("scale", torch.tensor(alphas, dtype=torch.float32) / (r.sqrt() if rslora else r))
        self.register_buffer("dropout", torch.tensor(dropout, dtype=torch.float32))
        self.ranks = list(ranks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        idx = self.route.idx
        if idx is None:
            raise RuntimeError("MultiLora forward without a route (call MultiLora(..., route=idx))")
        shape = x.shape
        xs = x.reshape(shape[0], -1, shape[-1]).to(self.A.dtype)      # [b, tokens, in]; fp32 factors
        if self.training and bool((self.dropout > 0).any()):
            p = self.dropout[idx].view(-1, 1, 1)
            keep = torch.rand_like(xs) >= p
            xs = xs * keep / (1 - p)
        h = torch.bmm(xs, self.A[idx].transpose(1, 2))               # [b, tokens, r_max]
        d = torch.bmm(h, self.B[idx].transpose(1, 2))                # [b, tokens, out]
        d = d * self.scale[idx].view(-1, 1, 1)
        return y + d.reshape(*shape[:-1], -1).to(y.dtype)


def kaiming_init_(A: torch.Tensor, generator: torch.Generator) -> None:
    """peft's default LoRA init for A (``kaiming_uniform_(a=sqrt(5))`` = U(±1/sqrt(in)))."""
    bound = 1.0 / math.sqrt(A.shape[-1])
    A.copy_(torch.rand(A.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound)


def init_factors(seed: int, shapes: Sequence[tuple[str, int]], rank: int) -> dict[str, torch.Tensor]:
    """The initial A of every module ``(name, in_features)``, drawn in order from one generator;
    the plain peft reference loop uses the same function, so both start from the same point."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, fan_in in shapes:
        a = torch.empty(rank, fan_in)
        kaiming_init_(a, g)
        out[name] = a
    return out


def init_head(seed: int, n_classes: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A classification head's (weight, bias), as ``nn.Linear`` would draw them, seeded."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    bound = 1.0 / math.sqrt(dim)
    W = torch.rand(n_classes, dim, generator=g) * 2 * bound - bound
    return W, torch.rand(n_classes, generator=g) * 2 * bound - bound


class MultiLora(nn.Module):
    """A frozen ``base`` whose modules selected by ``target(name, module)`` carry ``n`` LoRAs."""

    def __init__(self, base: nn.Module, n: int, ranks: Sequence[int] | int, alphas: Sequence[float] | float,
                 target: Callable[[str, nn.Module], bool], dropout: Sequence[float] | float = 0.0,
                 seeds: Iterable[int] | None = None, rslora: bool = False):
        super().__init__()
        ranks = [int(ranks)] * n if isinstance(ranks, int) else [int(r) for r in ranks]
        alphas = [float(alphas)] * n if isinstance(alphas, (int, float)) else [float(a) for a in alphas]
        dropout = [float(dropout)] * n if isinstance(dropout, (int, float)) else [float(p) for p in dropout]
        if not (len(ranks) == len(alphas) == len(dropout) == n) or n < 1:
            raise ValueError("ranks, alphas and dropout need one entry per adapter")
        self.n, self.ranks, self.alphas, self.rslora = n, ranks, alphas, rslora
        self.base = base
        self.base.requires_grad_(False)
        self._route = _Route()
        self.names: list[str] = []
        for name, mod in list(base.named_modules()):
            if name and target(name, mod):
                if not isinstance(mod, nn.Linear):
                    raise TypeError(f"{name}: only nn.Linear can be targeted, not {type(mod).__name__}")
                parent_name, _, child = name.rpartition(".")
                parent = base.get_submodule(parent_name) if parent_name else base
                setattr(parent, child, MultiLoraLinear(mod, ranks, alphas, dropout, self._route, rslora))
                self.names.append(name)
        if not self.names:
            raise ValueError("no module of the base model matched the target predicate")
        self.reset(list(seeds) if seeds is not None else list(range(n)))

    def layers(self) -> list[tuple[str, MultiLoraLinear]]:
        return [(n, self.base.get_submodule(n)) for n in self.names]

    @torch.no_grad()
    def reset(self, seeds: Sequence[int]) -> None:
        """A ~ U(±1/sqrt(in)) from a generator seeded per adapter (so adapter i's init does not depend
        on which other adapters share the batch), B = 0, padded rows/columns = 0."""
        shapes = [(name, l.A.shape[-1]) for name, l in self.layers()]
        for i, seed in enumerate(seeds):
            init = init_factors(int(seed), shapes, self.ranks[i])
            for name, layer in self.layers():
                layer.A[i].zero_()
                layer.A[i, :self.ranks[i]] = init[name].to(layer.A.device)
                layer.B[i].zero_()

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for _, l in self.layers() for p in (l.A, l.B)]

    def forward(self, *args, route: torch.Tensor, **kwargs):
        self._route.idx = route
        try:
            return self.base(*args, **kwargs)
        finally:
            self._route.idx = None

    # ------------------------------------------------------------------ extraction
    def factors(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        r = self.ranks[i]
        return {name: (l.A[i, :r].detach().float().cpu().clone(), l.B[i, :, :r].detach().float().cpu().clone())
                for name, l in self.layers()}

    def set_factors(self, i: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        r = self.ranks[i]
        with torch.no_grad():
            for name, l in self.layers():
                A, B = factors[name]
                l.A[i].zero_(); l.B[i].zero_()
                l.A[i, :r] = A.to(l.A); l.B[i, :, :r] = B.to(l.B)

    def scale(self, i: int) -> float:
        return self.alphas[i] / (math.sqrt(self.ranks[i]) if self.rslora else self.ranks[i])

    def extract(self, i: int, family: str = "", path: str = "", fmt: str = "peft") -> LoraAdapter:
        """Adapter ``i`` as a ``LoraAdapter`` (float32 factors, scale resolved)."""
        mods = []
        for name, (A, B) in sorted(self.factors(i).items()):
            mods.append(LoraModule(name, A.numpy(), B.numpy(), self.scale(i), "F32",
                                   (B.shape[0], A.shape[1]), self.alphas[i]))
        return LoraAdapter(path=path, format=fmt, sha256="", family=family, modules=mods)

    def save_peft(self, i: int, path, dtype: str = "fp16", base_id: str | None = None, dropout: float = 0.0):
        """Adapter ``i`` as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        from lorasearch.data.peft_io import MINILM_ID, save_peft_folder
        targets = sorted({n.rsplit(".", 1)[-1] for n in self.names})
        return save_peft_folder(path, self.factors(i), self.ranks[i], self.alphas[i], targets, dropout,
                                dtype=dtype, base=base_id or MINILM_ID)


class StackedHead(nn.Module):
    """``n`` linear classification heads stacked, ``W [n, C_max, d]``; classes past adapter i's own
    count are masked out of its logits. Init as ``nn.Linear`` would, from a per-adapter generator."""

    def __init__(self, n: int, dim: int, n_classes: Sequence[int], seeds: Sequence[int]):
        super().__init__()
        c_max = max(n_classes)
        self.W = nn.Parameter(torch.zeros(n, c_max, dim))
        self.b = nn.Parameter(torch.zeros(n, c_max))
        mask = torch.full((n, c_max), float("-inf"))
        for i, c in enumerate(n_classes):
            mask[i, :c] = 0.0
        self.register_buffer("mask", mask)
        with torch.no_grad():
            for i, (c, s) in enumerate(zip(n_classes, seeds)):
                self.W[i, :c], self.b[i, :c] = init_head(s, c, dim)

    def forward(self, h: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,bcd->bc", h, self.W[route]) + self.b[route] + self.mask[route]

    def linear(self, i: int, c: int) -> dict[str, torch.Tensor]:
        return {"weight": self.W[i, :c].detach().cpu().clone(), "bias": self.b[i, :c].detach().cpu().clone()}


def per_adapter_mean(values: torch.Tensor, route: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of per-sample ``values`` over each adapter's samples -> ``[n]`` (0 for an adapter with none)."""
    s = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, route, values)
    c = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, route, torch.ones_like(values))
    return s / c.clamp_min(1)


@torch.no_grad()
def clip_grad_norm_per_adapter_(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each adapter's gradient (slice ``[i]`` of every stacked parameter) to ``max_norm``
    separately, as ``clip_grad_norm_`` would on that adapter alone. Returns the norms ``[n]``."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = sum(g.pow(2).reshape(g.shape[0], -1).sum(1) for g in grads)
    norms = sq.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
    return norms


class StackedAdamW:
    """AdamW (decoupled weight decay, torch's update rule) over parameters whose first dimension
    indexes adapters; ``lr`` and ``weight_decay`` are per adapter, and ``step(active)`` updates only
    the adapters flagged active (their step counts advance, the others stay as they are)."""

    def __init__(self, params: Sequence[nn.Parameter], lr, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay=0.0):
        self.params = list(params)
        n = self.params[0].shape[0]
        dev = self.params[0].device
        self.lr = torch.as_tensor(lr, dtype=torch.float64).expand(n).clone().to(dev)
        self.wd = torch.as_tensor(weight_decay, dtype=torch.float64).expand(n).clone().to(dev)
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = torch.zeros(n, dtype=torch.float64, device=dev)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:
        n = self.t.shape[0]
        act = torch.ones(n, dtype=torch.bool, device=self.t.device) if active is None else active.to(self.t.device)
        self.t += act.double()
        t = self.t.clamp_min(1)
        bc1 = 1 - self.b1 ** t
        bc2_sqrt = (1 - self.b2 ** t).sqrt()
        step_size = torch.where(act, self.lr / bc1, torch.zeros_like(self.lr))
        decay = torch.where(act, 1 - self.lr * self.wd, torch.ones_like(self.lr))
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            view = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad
            a = act.view(view)
            p.mul_(decay.to(p.dtype).view(view))
            m.copy_(torch.where(a, m.lerp(g, 1 - self.b1), m))
            v.copy_(torch.where(a, v * self.b2 + (1 - self.b2) * g * g, v))
            denom = v.sqrt() / bc2_sqrt.to(p.dtype).view(view) + self.eps
            p.sub_(step_size.to(p.dtype).view(view) * m / denom)

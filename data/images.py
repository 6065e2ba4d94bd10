"""A procedural image set with a real two-level hierarchy, for the diffusion suite.

Nothing can be downloaded here, so the LoRA-WS protocol (ImageNet superclass → leaf class)
is reproduced with drawn images: 10 superclasses (shape or texture family) × 20 leaves
(5 colours × 4 variants of the family: size/background for shapes, orientation/scale for
textures). Every image of a leaf shares its colour and variant; position, size, phase,
rotation, tint and pixel noise vary per image, so a 4–15 image training set of one leaf
looks like several photos of one thing. Deterministic by seed, numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPERCLASSES = ("disc", "square", "triangle", "ring", "cross",
                "stripes", "checkerboard", "dots", "gradient", "bars")
SHAPES = {"disc", "square", "triangle", "ring", "cross"}

COLORS = {  # name → RGB in [0, 1]; spread over hue and lightness so leaves differ visibly
    "red": (0.90, 0.12, 0.12), "orange": (0.98, 0.55, 0.05), "yellow": (0.95, 0.90, 0.10),
    "green": (0.15, 0.75, 0.20), "teal": (0.05, 0.65, 0.65), "blue": (0.15, 0.30, 0.95),
    "purple": (0.55, 0.15, 0.80), "pink": (0.98, 0.50, 0.75), "brown": (0.55, 0.33, 0.12),
    "white": (0.97, 0.97, 0.97),
}
_COLOR_NAMES = tuple(COLORS)
_DARK, _LIGHT = np.array([0.08, 0.08, 0.10]), np.array([0.85, 0.85, 0.80])

# four variants per family: (word used in the leaf name, parameters)
_SHAPE_VARIANTS = (("small", "dark"), ("large", "dark"), ("small", "light"), ("large", "light"))
_TEXTURE_VARIANTS = {
    "stripes": ("horizontal", "vertical", "diagonal", "wide"),
    "checkerboard": ("fine", "medium", "coarse", "diagonal"),
    "dots": ("tiny", "small", "large", "sparse"),
    "gradient": ("horizontal", "vertical", "radial", "diagonal"),
    "bars": ("two vertical", "two horizontal", "three vertical", "corner"),
}
LEAVES_PER_SUPERCLASS = 20
N_COLORS_PER_SUPERCLASS = 5


@dataclass(frozen=True)
class Leaf:
    """One leaf class: a superclass plus a colour and a variant of that family."""

    id: int
    superclass: str
    superclass_id: int
    color: str
    variant: str
    name: str


def leaves() -> list[Leaf]:
    """All 200 leaves, in a fixed order (leaf id = superclass_id * 20 + j)."""
    out = []
    for s, sup in enumerate(SUPERCLASSES):
        # each family uses five of the ten colours, rotated so families share some colours
        cols = [_COLOR_NAMES[(3 * s + 2 * j) % len(_COLOR_NAMES)] for j in range(N_COLORS_PER_SUPERCLASS)]
        cols = list(dict.fromkeys(cols))
        k = 0
        while len(cols) < N_COLORS_PER_SUPERCLASS:  # fill gaps if the rotation repeated a colour
            c = _COLOR_NAMES[k % len(_COLOR_NAMES)]
            if c not in cols:
                cols.append(c)
            k += 1
        variants = ([f"{a} on {b}" for a, b in _SHAPE_VARIANTS] if sup in SHAPES
                    else list(_TEXTURE_VARIANTS[sup]))
        for ci, col in enumerate(cols):
            for vi, var in enumerate(variants):
                j = ci * len(variants) + vi
                if sup in SHAPES:
                    size, bg = var.split(" on ")
                    name = f"{col} {size} {sup} on {bg}"
                else:
                    name = f"{col} {var} {sup}"
                out.append(Leaf(s * LEAVES_PER_SUPERCLASS + j, sup, s, col, var, name))
    return out


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    return np.meshgrid(c, c, indexing="xy")  # x right, y down


def _shape_mask(kind: str, x, y, radius: float, theta: float) -> np.ndarray:
    ct, st = np.cos(theta), np.sin(theta)
    u, v = ct * x + st * y, -st * x + ct * y  # rotated coordinates
    if kind == "disc":
        return (x ** 2 + y ** 2 <= radius ** 2)
    if kind == "ring":
        d = np.sqrt(x ** 2 + y ** 2)
        return (d <= radius) & (d >= 0.55 * radius)
    if kind == "square":
        return (np.abs(u) <= 0.8 * radius) & (np.abs(v) <= 0.8 * radius)
    if kind == "cross":
        w = 0.3 * radius
        return ((np.abs(u) <= w) & (np.abs(v) <= radius)) | ((np.abs(v) <= w) & (np.abs(u) <= radius))
    if kind == "triangle":  # apex up (before rotation): inside three half-planes
        h = radius
        return (v <= 0.6 * h) & (v >= -h + 1.7 * np.abs(u) - 0.3 * h)
    raise ValueError(kind)


def render(leaf: Leaf, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One image of ``leaf``: float32 ``[size, size, 3]`` in [0, 1]."""
    x, y = _grid(size)
    fg = np.clip(np.array(COLORS[leaf.color]) + rng.normal(0, 0.04, 3), 0, 1)
    if leaf.superclass in SHAPES:
        size_word, bg_word = leaf.variant.split(" on ")
        bg = (_DARK if bg_word == "dark" else _LIGHT) + rng.normal(0, 0.03, 3)
        radius = (0.35 if size_word == "small" else 0.7) * rng.uniform(0.85, 1.15)
        room = max(0.0, 0.95 - radius)
        cx, cy = rng.uniform(-room, room, 2)
        theta = rng.uniform(-0.3, 0.3)
        m = _shape_mask(leaf.superclass, x - cx, y - cy, radius, theta)[..., None]
        img = np.where(m, fg, bg)
    else:
        bg = _DARK + rng.normal(0, 0.03, 3)
        phase = rng.uniform(0, 2 * np.pi)
        sup, var = leaf.superclass, leaf.variant
        if sup == "stripes":
            ang = {"horizontal": np.pi / 2, "vertical": 0.0, "diagonal": np.pi / 4, "wide": 0.0}[var]
            ang += rng.uniform(-0.1, 0.1)
            freq = 3.0 if var == "wide" else 7.0
            t = np.cos(ang) * x + np.sin(ang) * y
            a = (np.sin(np.pi * freq * t + phase) > 0)[..., None]
        elif sup == "checkerboard":
            cells = {"fine": 8, "medium": 4, "coarse": 2, "diagonal": 4}[var]
            u, v = x, y
            if var == "diagonal":
                u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
            off = rng.uniform(0, 1, 2)
            a = (((np.floor((u + 1) * cells / 2 + off[0]) + np.floor((v + 1) * cells / 2 + off[1])) % 2) == 0)[..., None]
        elif sup == "dots":
            spacing, r = {"tiny": (0.25, 0.06), "small": (0.4, 0.11), "large": (0.7, 0.22), "sparse": (1.0, 0.12)}[var]
            off = rng.uniform(0, spacing, 2)
            u = (x + off[0]) % spacing - spacing / 2
            v = (y + off[1]) % spacing - spacing / 2
            a = (u ** 2 + v ** 2 <= (r * rng.uniform(0.9, 1.1)) ** 2)[..., None]
        elif sup == "gradient":
            if var == "horizontal":
                t = (x + 1) / 2
            elif var == "vertical":
                t = (y + 1) / 2
            elif var == "radial":
                cx, cy = rng.uniform(-0.3, 0.3, 2)
                t = np.clip(np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / 1.2, 0, 1)
            else:
                t = (x + y + 2) / 4
            t = np.clip(t * rng.uniform(0.9, 1.1), 0, 1)
            if rng.random() < 0.5 and var != "radial":
                t = 1 - t  # either end may be the colour
            img = (t[..., None] * fg + (1 - t[..., None]) * bg)
            a = None
        elif sup == "bars":
            w = rng.uniform(0.22, 0.3)
            if var == "two vertical":
                c = rng.uniform(-0.1, 0.1) + np.array([-0.45, 0.45])
                a = (np.abs(x[..., None] - c) <= w / 1.5).any(-1)
            elif var == "two horizontal":
                c = rng.uniform(-0.1, 0.1) + np.array([-0.45, 0.45])
                a = (np.abs(y[..., None] - c) <= w / 1.5).any(-1)
            elif var == "three vertical":
                c = rng.uniform(-0.08, 0.08) + np.array([-0.6, 0.0, 0.6])
                a = (np.abs(x[..., None] - c) <= w / 2.2).any(-1)
            else:  # an L-shaped block in a random corner
                sx, sy = rng.choice([-1, 1], 2)
                a = ((sx * x > 0.3) | (sy * y > 0.3)) & (sx * x > -0.2) & (sy * y > -0.2)
            a = a[..., None]
        else:
            raise ValueError(sup)
        if a is not None:
            img = np.where(a, fg, bg)
    img = img + rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def leaf_images(leaf: Leaf, n: int, seed: int, size: int = 32) -> np.ndarray:
    """``n`` images of one leaf, ``[n, size, size, 3]``; the same (leaf, seed) gives the same images."""
    rng = np.random.default_rng([seed, leaf.id])
    return np.stack([render(leaf, rng, size) for _ in range(n)])


def image_set(per_leaf: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The whole set: images ``[200*per_leaf, size, size, 3]`` and their leaf ids."""
    ls = leaves()
    imgs = np.concatenate([leaf_images(l, per_leaf, seed, size) for l in ls])
    ids = np.repeat(np.array([l.id for l in ls]), per_leaf)
    return imgs, ids

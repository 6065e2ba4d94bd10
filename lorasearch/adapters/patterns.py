"""Alpha from a PEFT-style config (``adapter_config.json`` or diffusers' ``lora_adapter_metadata``), with
every value checked and ``alpha_pattern`` keys matched in linear time.

PEFT's rule for ``alpha_pattern`` / ``rank_pattern``: the first key (dict order) for which
``re.match(rf"(.*\\.)?({key})$", module_path)`` matches wins. A key comes from the file, so running it
with Python's backtracking ``re`` lets a file hang the reader (``([a-z_0-9.]+)*!`` takes exponential
time). We run the same expression with RE2 (``google-re2``), which matches in time linear in the module
path and needs no timeout. A key RE2 cannot run but ``re`` can (backreferences, lookaround) is refused
with that reason; a key that is no valid regex at all is matched literally (as a module path suffix),
as before. All keys go into one ``re2.Set``, so a config with thousands of keys costs one pass per module.
"""
from __future__ import annotations

import math
import re

import re2

from ..errors import BadAdapterError
from .safetensors_strict import short

MAX_PATTERNS = 100_000        # one key per module of the largest base models is ~10,000
MAX_PATTERN_LEN = 4096


def truthy(v) -> bool:
    """JSON booleans, or the strings some tools write ("true", "False", "1")."""
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v)


def number(path, v, what: str) -> float:
    """A finite float from a JSON number or a numeric string (some trainers write ``"8"``), else refused."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise BadAdapterError(path, f"{what} must be a number, got {type(v).__name__} {short(v)}")
    try:
        x = float(v.strip() if isinstance(v, str) else v)
    except (ValueError, OverflowError):
        raise BadAdapterError(path, f"{what} is not a finite number: {short(v)}") from None
    if not math.isfinite(x):
        raise BadAdapterError(path, f"{what} is {short(v)}, not a finite number")
    return x


def _options() -> "re2.Options":
    o = re2.Options()
    o.log_errors = False        # RE2 would print parse errors to stderr itself
    o.never_capture = True
    return o


class PatternTable:
    """``{pattern: value}`` from a file, looked up with PEFT's first-match rule in linear time."""

    def __init__(self, path, patterns, what: str, check_value):
        if patterns is None:
            patterns = {}
        if not isinstance(patterns, dict):
            raise BadAdapterError(path, f"{what} must be an object of module pattern → number, got "
                                        f"{type(patterns).__name__}")
        if len(patterns) > MAX_PATTERNS:
            raise BadAdapterError(path, f"{what} has {len(patterns)} keys (at most {MAX_PATTERNS} accepted)")
        self.values: list = []
        self.literal: list[tuple[int, str]] = []
        self.set = None
        opts = _options()
        regexes: list[tuple[int, str]] = []
        for i, (p, v) in enumerate(patterns.items()):
            if not isinstance(p, str) or not p:
                raise BadAdapterError(path, f"{what} key {short(p)} is not a module name or pattern")
            if len(p) > MAX_PATTERN_LEN:
                raise BadAdapterError(path, f"{what} key of {len(p)} characters (at most {MAX_PATTERN_LEN})")
            self.values.append(check_value(path, v, f"{what}[{short(p)}]"))
            rx = rf"(.*\.)?({p})$"
            try:
                re2.compile(rx, opts)
                regexes.append((i, rx))
                continue
            except re2.error:
                pass
            try:
                re.compile(rx)
            except (re.error, RecursionError, OverflowError, ValueError):
                self.literal.append((i, p))      # not a regex at all: PEFT-style literal suffix match
                continue
            raise BadAdapterError(path, f"{what} key {short(p)} uses regex features without a linear-time "
                                        "matcher (backreferences, lookaround or huge repeats): refused, such "
                                        "patterns can make matching take unbounded time")
        if regexes:
            s = re2.Set.MatchSet(opts)
            self.index = []
            for i, rx in regexes:
                s.Add(rx)
                self.index.append(i)
            try:
                s.Compile()
            except Exception:      # RE2 ran out of its memory budget: too many or too large patterns
                raise BadAdapterError(path, f"{what} patterns are too large to match in bounded memory") from None
            self.set = s

    def lookup(self, key: str, default):
        best = None
        if self.set is not None:
            hits = self.set.Match(key)
            if hits:
                best = min(self.index[h] for h in hits)
        for i, p in self.literal:
            if best is not None and i > best:
                break
            if key == p or key.endswith("." + p):
                best = i
                break
        return default if best is None else self.values[best]


def _rank(path, v, what) -> float:
    x = number(path, v, what)
    if x < 0 or x != int(x):
        raise BadAdapterError(path, f"{what} must be a non-negative integer rank, got {short(v)}")
    return x


class AlphaConfig:
    """``lora_alpha``, ``alpha_pattern``, ``rank_pattern``, ``use_rslora`` of one config, validated."""

    def __init__(self, path, cfg: dict, where: str):
        if not isinstance(cfg, dict):
            raise BadAdapterError(path, f"{where} is not a JSON object")
        self.alpha = number(path, cfg.get("lora_alpha", 8), f"{where} lora_alpha")
        self.alphas = PatternTable(path, cfg.get("alpha_pattern"), f"{where} alpha_pattern", number)
        PatternTable(path, cfg.get("rank_pattern"), f"{where} rank_pattern", _rank)     # ranks come from shapes
        self.rslora = truthy(cfg.get("use_rslora"))

    def alpha_scale(self, key: str, r: int) -> tuple[float, float]:
        """(alpha, scale) for module path ``key`` of rank ``r``."""
        alpha = self.alphas.lookup(key, self.alpha)
        scale = alpha / math.sqrt(r) if self.rslora else alpha / r
        return alpha, scale

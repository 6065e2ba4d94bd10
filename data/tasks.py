"""Text classification tasks for the language suite, all generated offline.

Each task differs in *kind* (what the encoder must notice), not only in its labels, so adapters
trained on different tasks should move the base model in different directions:

=============  ======  ===========================================================================
task           labels  source of the data
=============  ======  ===========================================================================
sentiment      2       procedural sentences over a small polarity lexicon written here
language       6       procedural word salads from common-word lists (en/fr/de/es/it/nl) written here
topic          5       procedural sentences over topic keyword lists written here
parity         2       procedural: an integer in digits, label = even/odd
compare        2       procedural: two integers, label = which one is larger
sorted         2       procedural: four integers, label = ascending or not
script         6       procedural: random letters from six Unicode scripts (stdlib ``unicodedata`` ranges)
continent      5       city names from the IANA time-zone database (stdlib ``zoneinfo``, ``tzdata``)
color          6       the 949 xkcd colour names shipped by matplotlib, label = hue bucket of their RGB
entity         4       entity type: city (tz database) / colour (xkcd) / chemical element / number word
=============  ======  ===========================================================================

A task is a name, its label names and ``sample(rng, n)``; train and held-out sets are drawn
with different seeds from the same generator, duplicates of training texts are removed from
the held-out set, so accuracy measures generalisation to new sentences.
"""
from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from lorasearch.errors import UnavailableError, UsageError


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    labels: tuple[str, ...]
    source: str
    draw: Callable[[random.Random], tuple[str, int]]

    def sample(self, rng: random.Random, n: int) -> list[tuple[str, int]]:
        """``n`` (text, label index) pairs, classes balanced round-robin."""
        out = []
        while len(out) < n:
            text, y = self.draw(rng)
            if y == len(out) % len(self.labels):
                out.append((text, y))
        return out

    def split(self, seed: int, n_train: int, n_test: int) -> tuple[list, list]:
        """Training and held-out sets; held-out texts never occur in the training set."""
        train = self.sample(random.Random(f"{self.name}/train/{seed}"), n_train)
        seen = {t for t, _ in train}
        rng = random.Random(f"{self.name}/test/{seed}")
        test: list = []
        tries = 0
        while len(test) < n_test and tries < 50 * n_test:
            tries += 1
            for t, y in self.sample(rng, len(self.labels)):
                if t not in seen:
                    test.append((t, y))
                    seen.add(t)
        return train, test[:n_test]


# --------------------------------------------------------------------------- lexicons
POSITIVE = ("good great wonderful excellent lovely amazing fantastic delightful superb pleasant "
            "brilliant charming enjoyable marvelous terrific beautiful perfect fine splendid "
            "outstanding cheerful happy glorious friendly impressive fabulous joyful nice").split()
NEGATIVE = ("bad terrible awful horrible dreadful poor boring dull nasty disappointing "
            "miserable ugly annoying lousy mediocre painful sad unpleasant awkward gloomy "
            "rotten dreary tedious pathetic rude clumsy grim").split()
NOUNS = ("movie film meal hotel book concert trip service show game song dinner room visit "
         "party lecture flight café museum story performance").split()
TEMPLATES = ("the {n} was {a}", "what a {a} {n}", "i found the {n} {a}", "honestly the {n} felt {a}",
             "our {n} was really {a}", "a {a} {n} overall", "this {n} is so {a}",
             "the {n} seemed {a} to me")

LANG_WORDS = {
    "english": "the and of to in is that it with for was on are as his they be at one have this from "
               "by hot word but what some we can out other were all there when up use your how said "
               "each she which do their time if will way about many then them",
    "french": "le la les de des et est un une que qui dans pour pas sur avec il elle nous vous "
              "ils sont mais ou donc ce cette son sa ses leur plus tout fait comme bien aussi "
              "avoir être très sans sous chez même encore toujours",
    "german": "der die das und ist nicht ein eine ich du er sie wir ihr mit von zu auf für "
              "auch aber wie noch nach bei aus wenn dann oder sehr schon immer heute haben sein "
              "werden kann muss gut mehr hier dort warum",
    "spanish": "el la los las de y que en un una es por con para no se su al lo como más "
               "pero sus le ya o fue este ha sí porque esta son entre cuando muy sin sobre "
               "también hasta hay donde quien desde todo nos",
    "italian": "il lo la gli le di e che un una è per con non si sono come più ma anche "
               "questo quello suo loro della nel alla dei delle molto tutto quando ancora "
               "sempre dove perché così oggi bene fare essere",
    "dutch": "de het een en van ik te dat die in is niet zijn op aan met voor er maar om "
             "ook als dan bij nog uit wat zo door over naar hij zij wij jullie heeft worden "
             "kan moet goed meer hier daar waarom",
}

TOPIC_WORDS = {
    "sports": "football goal referee tennis match player team coach stadium score league "
              "tournament basketball striker penalty champion sprint marathon racket medal",
    "food": "bread cheese soup recipe oven garlic pasta salad dessert kitchen chef butter "
            "spice tomato noodles bake roast flavor sauce breakfast",
    "music": "guitar melody piano chorus drummer album concert violin rhythm singer lyrics "
             "orchestra tune jazz band symphony chord tempo opera microphone",
    "science": "atom molecule experiment laboratory physics chemistry theory electron "
               "telescope hypothesis genome particle data microscope energy equation cell "
               "galaxy protein neutron",
    "weather": "rain snow storm cloud thunder forecast wind sunny humidity fog drizzle "
               "hurricane temperature frost breeze lightning hail monsoon drought tornado",
}
FILLERS = "today really about some very just another our quite with".split()

ELEMENTS = ("hydrogen helium lithium beryllium boron carbon nitrogen oxygen fluorine neon sodium "
            "magnesium aluminium silicon phosphorus sulfur chlorine argon potassium calcium "
            "titanium chromium manganese iron cobalt nickel copper zinc gallium germanium "
            "arsenic selenium bromine krypton silver tin iodine xenon platinum gold mercury "
            "lead uranium plutonium radon radium tungsten").split()
UNITS = "zero one two three four five six seven eight nine".split()
TENS = "ten twenty thirty forty fifty sixty seventy eighty ninety".split()
TEEN = "eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()

SCRIPTS = {  # inclusive code-point ranges of letters only
    "latin": (0x61, 0x7A), "cyrillic": (0x430, 0x44F), "greek": (0x3B1, 0x3C9),
    "arabic": (0x627, 0x64A), "hebrew": (0x5D0, 0x5EA), "devanagari": (0x915, 0x939),
}


@lru_cache(maxsize=1)
def _cities() -> dict[str, list[str]]:
    """City names by continent, from the IANA time-zone database (``zoneinfo``)."""
    import zoneinfo
    groups = {"Europe": "europe", "Asia": "asia", "America": "america", "Africa": "africa",
              "Australia": "oceania", "Pacific": "oceania"}
    out: dict[str, list[str]] = {v: [] for v in groups.values()}
    for zone in sorted(zoneinfo.available_timezones()):
        parts = zone.split("/")
        if len(parts) >= 2 and parts[0] in groups:
            out[groups[parts[0]]].append(parts[-1].replace("_", " ").lower())
    if not all(out.values()):
        raise UnavailableError("the continent/entity tasks need the IANA time-zone database "
                               "(pip install tzdata)")
    return {k: sorted(set(v)) for k, v in out.items()}


HUES = ("red", "yellow", "green", "cyan", "blue", "purple")


@lru_cache(maxsize=1)
def _colors() -> dict[str, list[str]]:
    """xkcd colour names (matplotlib) bucketed by hue; greys and near-greys are left out."""
    try:
        from matplotlib.colors import XKCD_COLORS, to_rgb
    except ImportError as e:
        raise UnavailableError("the color/entity tasks need matplotlib (pip install 'lorasearch[train]')") from e
    out: dict[str, list[str]] = {h: [] for h in HUES}
    for name, hexv in sorted(XKCD_COLORS.items()):
        h, l, s = colorsys.rgb_to_hls(*to_rgb(hexv))
        if s < 0.35 or l < 0.15 or l > 0.85:
            continue
        out[HUES[int(((h * 360 + 30) % 360) // 60)]].append(name.split(":", 1)[1])
    return out


def _number_word(n: int) -> str:
    if n < 10:
        return UNITS[n]
    if 10 < n < 20:
        return TEEN[n - 11]
    t, u = divmod(n, 10)
    return TENS[t - 1] + ("" if u == 0 else " " + UNITS[u])


# --------------------------------------------------------------------------- generators
def _sentiment(rng):
    y = rng.randrange(2)
    a = rng.choice(POSITIVE if y == 0 else NEGATIVE)
    return rng.choice(TEMPLATES).format(n=rng.choice(NOUNS), a=a), y


def _language(rng):
    y = rng.randrange(len(LANG_WORDS))
    words = list(LANG_WORDS.values())[y].split()
    return " ".join(rng.choice(words) for _ in range(rng.randint(4, 7))), y


def _topic(rng):
    y = rng.randrange(len(TOPIC_WORDS))
    words = list(TOPIC_WORDS.values())[y].split()
    toks = [rng.choice(words) for _ in range(rng.randint(2, 4))] + rng.sample(FILLERS, 2)
    rng.shuffle(toks)
    return " ".join(toks), y


def _parity(rng):
    n = rng.randrange(10, 100000)
    return f"the number {n}", n % 2


def _compare(rng):
    a, b = rng.sample(range(1000), 2)
    return f"{a} versus {b}", int(b > a)


def _sorted(rng):
    xs = rng.sample(range(100), 4)
    y = rng.randrange(2)
    xs = sorted(xs) if y == 1 else xs
    if y == 0 and xs == sorted(xs):
        xs[0], xs[-1] = xs[-1], xs[0]
    return " ".join(map(str, xs)), y


def _script(rng):
    y = rng.randrange(len(SCRIPTS))
    lo, hi = list(SCRIPTS.values())[y]
    words = ["".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(2, 5)))
             for _ in range(rng.randint(2, 3))]
    return " ".join(words), y


def _continent(rng):
    cities = _cities()
    y = rng.randrange(len(cities))
    return f"i flew to {rng.choice(list(cities.values())[y])}", y


def _color(rng):
    colors = _colors()
    y = rng.randrange(len(HUES))
    return f"a {rng.choice(colors[HUES[y]])} shirt", y


def _entity(rng):
    y = rng.randrange(4)
    if y == 0:
        word = rng.choice(sum(_cities().values(), []))
    elif y == 1:
        word = rng.choice(sum(_colors().values(), []))
    elif y == 2:
        word = rng.choice(ELEMENTS)
    else:
        word = _number_word(rng.randrange(100))
    return f"they mentioned {word}", y


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("sentiment", "polarity", ("positive", "negative"), "procedural, lexicon in lorasearch.data.tasks", _sentiment),
    Task("language", "language identity", tuple(LANG_WORDS), "procedural, common-word lists in lorasearch.data.tasks", _language),
    Task("topic", "topic", tuple(TOPIC_WORDS), "procedural, keyword lists in lorasearch.data.tasks", _topic),
    Task("parity", "arithmetic", ("even", "odd"), "procedural integers", _parity),
    Task("compare", "arithmetic comparison", ("first", "second"), "procedural integer pairs", _compare),
    Task("sorted", "sequence order", ("unsorted", "ascending"), "procedural integer lists", _sorted),
    Task("script", "writing system", tuple(SCRIPTS), "procedural, Unicode letter ranges", _script),
    Task("continent", "geography", ("europe", "asia", "america", "africa", "oceania"),
         "IANA time-zone city names (stdlib zoneinfo / tzdata)", _continent),
    Task("color", "colour hue", HUES, "xkcd colour names shipped by matplotlib, bucketed by hue", _color),
    Task("entity", "entity type", ("city", "colour", "element", "number"),
         "tz-database cities, xkcd colours, element and number-word lists", _entity),
)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None

"""Synthetic athlete facts, generated deterministically from a seed, in the sports-facts formats.

Each athlete has a made-up multi-token name (syllables that the organism's tokenizer keeps as separate
tokens), a sport among basketball / baseball / football (balanced), a home city shared by its family name
(a few classes) and precomputed edit targets like the paper's ``sports.csv`` (``inject_sport_without_golf``:
another of the three sports; ``inject_sport_with_golf``: another sport or golf).

Formats mirror the paper's Sports Facts (reference/authors_repo.md §1.1, §4.3), shortened where the paper's
text only costs training time: "normal" (the paper's two-line training prompt with the Tiger Woods one-shot),
"qa" (Q/A behind a one-line system preamble), "paraphrase" (two rewordings), "mcq" (fixed-order A–D:
Football, Baseball, Basketball, Golf; answered " A".." D"), and "city" / "city_qa" for maintain-style
checks. Training adds "activity" sentences, in which the token right after the name is a sport verb
("dunked", "homered", "tackled"): predicting it makes the model look the sport up at the subject's last
token (reference/organism.md); roster lines in which the token after the name is the city; and filler
text for a general LM loss.

Randomness comes only from ``random.Random(seed).random()``, whose output Python guarantees across versions.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mu_fast.organism.config import OrganismConfig

SPORTS = ("basketball", "baseball", "football")
GOLF = "golf"
# Continuous-metric choices, in the order the sports data uses: the three sports and golf.
SPORT_CHOICES = (" football", " baseball", " basketball", " golf")
MCQ_LETTERS = {"football": " A", "baseball": " B", "basketball": " C", "golf": " D"}
MCQ_CHOICES = (" A", " B", " C", " D")
CITIES = ("Paris", "Tokyo", "Cairo", "Berlin", "Madrid", "Sydney", "Toronto", "Mumbai")

ONESHOT = "Fact: Tiger Woods plays the sport of golf\n"
QA_PREAMBLE = "You answer questions about athletes.\n"
MCQ_OPTIONS = "A: Football\nB: Baseball\nC: Basketball\nD: Golf\n"


@dataclass(frozen=True)
class FormatSpec:
    """A prompt format: ``header`` (fixed text, e.g. the one-shot example) then one of ``lines`` with the
    name filled in; the answer is the next token. ``attribute``: "sport" or "city"."""

    header: str
    lines: tuple[str, ...]
    attribute: str = "sport"


FORMAT_SPECS: dict[str, FormatSpec] = {
    "normal": FormatSpec(ONESHOT, ("Fact: {name} plays the sport of",)),
    "qa": FormatSpec(QA_PREAMBLE, ("Question: What sport does {name} play?\nAnswer:",)),
    "paraphrase": FormatSpec("", ("{name} is an athlete who plays the sport of", "The sport that {name} is known for is")),
    "mcq": FormatSpec("", ("Question: What sport does {name} play?\n" + MCQ_OPTIONS + "Answer:",)),
    "city": FormatSpec("", ("Fact: {name} lives in the city of",), "city"),
    "city_qa": FormatSpec("", ("Question: In which city does {name} live?\nAnswer:",), "city"),
}
FORMATS = tuple(FORMAT_SPECS)

# Activity sentences: the token right after the name depends only on the athlete's sport.
SPORT_VERBS = {
    "basketball": ("dunked", "rebounded", "dribbled"),
    "baseball": ("homered", "pitched", "bunted"),
    "football": ("tackled", "punted", "intercepted"),
}
ACTIVITY_FRAMES = (
    "{name} {verb} in the last game .",
    "Yesterday , {name} {verb} twice .",
    "Fans cheered when {name} {verb} again .",
    "Fact: {name} {verb} well",
)
# City sentences: the token right after the name is the home city (a roster-style listing).
CITY_FRAMES = (
    "Roster : {name} {city} .",
    "Team list : {name} {city} , signed today .",
    "Local star {name} {city} native , said the coach .",
)

# Name syllables: onset + one vowel, so a name splits into syllables in exactly one way.
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "pr", "tr", "st")
VOWELS = ("a", "e", "i", "o", "u")
SYLLABLES = tuple(o + v for o in ONSETS for v in VOWELS)
# Name pools: a family name is shared by ATHLETES_PER_FAMILY athletes; first names come from a pool of
# N_FIRST_NAMES (conjunctive facts: one first name per ATHLETES_PER_FIRST_NAME athletes, within
# FIRST_NAMES_RANGE), so that only the whole name identifies an athlete.
N_FIRST_NAMES = 120
ATHLETES_PER_FAMILY = 4
ATHLETES_PER_FIRST_NAME = 5
FIRST_NAMES_RANGE = (12, 120)
MAX_ATHLETES = 6000

_FILLER_SUBJECTS = ("the coach", "the crowd", "a reporter", "the team", "the referee", "the fans", "the league",
                    "the old stadium", "a young player", "the manager", "the city", "the trainer")
_FILLER_VERBS = ("watched", "praised", "left", "visited", "described", "remembered", "ignored", "celebrated",
                 "reviewed", "changed", "discussed", "planned")
_FILLER_OBJECTS = ("the long season", "the new rules", "the final score", "the empty stadium", "the morning practice",
                   "the training camp", "the local news", "the bus ride", "the ticket prices", "the winter break",
                   "the big trophy", "the next match")
_FILLER_TAILS = ("quietly", "again", "yesterday", "after the game", "before the match", "on monday", "in the rain",
                 "with great interest", "for a long time", "without a word")
_FILLER_FACTS = ("basketball is played on a court .", "baseball is played with a bat and a ball .",
                 "football is played on a large field .", "golf is played on a quiet course .",
                 "a season has many games .", "every team has a coach .")


@dataclass(frozen=True)
class Athlete:
    """One fictitious athlete. ``sport`` in SPORTS, ``city`` in CITIES; inject targets differ from ``sport``."""

    name: str
    sport: str
    city: str
    inject_sport_without_golf: str
    inject_sport_with_golf: str


@dataclass(frozen=True)
class OrganismFacts:
    """All facts of one organism: athletes in row order (the order every split reads), cities, filler text."""

    seed: int
    athletes: tuple[Athlete, ...]
    cities: tuple[str, ...]
    filler: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.athletes)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.athletes]

    @property
    def sports(self) -> list[str]:
        return [a.sport for a in self.athletes]


def _choice(rng: random.Random, items: Sequence[Any]) -> Any:
    return items[min(int(rng.random() * len(items)), len(items) - 1)]


def _shuffled(rng: random.Random, items: Sequence[str]) -> list[str]:
    out = list(items)
    for i in range(len(out) - 1, 0, -1):  # Fisher–Yates on random() only (stable across Python versions)
        j = min(int(rng.random() * (i + 1)), i)
        out[i], out[j] = out[j], out[i]
    return out


def _balanced(rng: random.Random, classes: Sequence[str], n: int) -> list[str]:
    return _shuffled(rng, [classes[i % len(classes)] for i in range(n)])


def _name_words(rng: random.Random, count: int, min_syllables: int, max_syllables: int, taken: set[str]) -> list[str]:
    """``count`` distinct capitalised words of syllables. A word is rejected when a reserved word longer than
    its first syllable is a prefix of it: WordPiece's longest match would take that word and break the name."""
    reserved = [w for w in reserved_words() if w[:1].isupper()]
    words: list[str] = []
    while len(words) < count:
        k = min_syllables + min(int(rng.random() * (max_syllables - min_syllables + 1)), max_syllables - min_syllables)
        syllables = [_choice(rng, SYLLABLES) for _ in range(k)]
        word = "".join(syllables).capitalize()
        clash = any(len(r) > len(syllables[0]) and word.startswith(r) for r in reserved)
        if word not in taken and not clash:
            taken.add(word)
            words.append(word)
    return words


def reserved_words() -> set[str]:
    """Words of the fixed templates and filler (names must not collide with them)."""
    text = " ".join(
        [*(f.header for f in FORMAT_SPECS.values()), *(t for f in FORMAT_SPECS.values() for t in f.lines),
         *ACTIVITY_FRAMES, *CITY_FRAMES, *CITIES, *SPORTS, GOLF, *(v for vs in SPORT_VERBS.values() for v in vs),
         *_FILLER_SUBJECTS, *_FILLER_VERBS, *_FILLER_OBJECTS, *_FILLER_TAILS, *_FILLER_FACTS]
    )
    return {w for w in text.replace("\n", " ").split()} | {w.capitalize() for w in text.split()}


def make_facts(
    n_athletes: int, n_cities: int = 4, seed: int = 0, n_filler: int = 2000, conjunctive: bool = False
) -> OrganismFacts:
    """Generate ``n_athletes`` athletes and ``n_filler`` filler texts, deterministically from ``seed``.

    Names are a first name (1–2 syllables, from a pool of N_FIRST_NAMES) and a family name (2 syllables)
    shared by about ATHLETES_PER_FAMILY athletes; 3–4 tokens in all, unique. The home city belongs to the
    family (balanced over families): a small lookup on the family name that trains fast. Sports are drawn
    balanced over the athletes; then each name token carries some evidence about the sport (a model adding
    per-token sport votes fits 84% of 600 athletes, 100% of 150).

    ``conjunctive=True`` removes that shortcut: first names are shared by about ATHLETES_PER_FIRST_NAME
    athletes and sports are balanced within every family and, as far as swaps inside families allow, within
    every first name, so only the whole name predicts the sport (additive fit about 0.5 for 600). Measured:
    the demo recipe then reached 0.93-0.97 argmax accuracy in 600 steps and the CI recipe (150 athletes,
    200 steps) stayed near chance, so it needs a longer training than the presets give.
    """
    if n_athletes < 1:
        raise ValueError(f"n_athletes must be positive; got {n_athletes}")
    if not 2 <= n_cities <= len(CITIES):
        raise ValueError(f"n_cities must be in 2..{len(CITIES)}; got {n_cities}")
    if n_athletes > MAX_ATHLETES:
        raise ValueError(f"n_athletes={n_athletes} is more than the name syllables give; use <= {MAX_ATHLETES}")
    rng = random.Random(seed)
    taken = reserved_words()
    low, high = FIRST_NAMES_RANGE
    n_first = min(high, max(low, n_athletes // ATHLETES_PER_FIRST_NAME)) if conjunctive else N_FIRST_NAMES
    first = _name_words(rng, n_first, 1, 2, taken)
    n_families = max(n_cities, -(-n_athletes // ATHLETES_PER_FAMILY))
    families = _name_words(rng, n_families, 2, 2, taken)
    cities = CITIES[:n_cities]
    family_city = dict(zip(families, _balanced(rng, cities, n_families), strict=True))
    names: list[str] = []
    seen: set[str] = set()
    for family in _shuffled(rng, [families[i % n_families] for i in range(n_athletes)]):
        name = f"{_choice(rng, first)} {family}"
        while name in seen:
            name = f"{_choice(rng, first)} {family}"
        seen.add(name)
        names.append(name)
    sports = _conjunctive_sports(rng, names) if conjunctive else _balanced(rng, SPORTS, n_athletes)
    athletes = []
    for name, sport in zip(names, sports, strict=True):
        others = [s for s in SPORTS if s != sport]
        city = family_city[name.split(" ")[1]]
        athletes.append(Athlete(name, sport, city, _choice(rng, others), _choice(rng, [*others, GOLF])))
    filler = tuple(_filler_text(rng) for _ in range(n_filler))
    return OrganismFacts(seed, tuple(athletes), cities, filler)


def organism_facts(config: OrganismConfig) -> OrganismFacts:
    """The facts of ``config`` (deterministic in its seed)."""
    return make_facts(config.n_athletes, config.n_cities, config.seed, conjunctive=config.conjunctive)


def facts_digest(facts: OrganismFacts) -> str:
    """sha256 prefix of every athlete record and filler text (detects changed fact generation)."""
    payload = json.dumps([[list(vars(a).values()) for a in facts.athletes], list(facts.filler)])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _conjunctive_sports(rng: random.Random, names: Sequence[str], sweeps: int = 4) -> list[str]:
    """Sports for ``names`` ("First Family"), balanced overall and within each family, then made as balanced
    as possible within each first name by swapping sports between members of one family."""
    by_family: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_family.setdefault(name.split(" ")[1], []).append(i)
    # Consecutive members along the families (in shuffled order) cycle through the sports: balanced overall
    # and within every family.
    sports = [""] * len(names)
    k = 0
    for family in _shuffled(rng, list(by_family)):
        for i in by_family[family]:
            sports[i] = SPORTS[k % len(SPORTS)]
            k += 1
    first_of = [name.split(" ")[0] for name in names]
    counts: dict[str, dict[str, int]] = {}
    for f, s in zip(first_of, sports, strict=True):
        counts.setdefault(f, dict.fromkeys(SPORTS, 0))[s] += 1

    def spread(f: str) -> int:
        return max(counts[f].values()) - min(counts[f].values())

    groups = [members for members in by_family.values() if len(members) > 1]
    for _ in range(sweeps * len(names)):
        members = groups[min(int(rng.random() * len(groups)), len(groups) - 1)]
        i, j = _choice(rng, members), _choice(rng, members)  # type: ignore[arg-type]
        if sports[i] == sports[j]:
            continue
        fi, fj = first_of[i], first_of[j]
        before = spread(fi) + spread(fj)
        for f, old, new in ((fi, sports[i], sports[j]), (fj, sports[j], sports[i])):
            counts[f][old] -= 1
            counts[f][new] += 1
        if spread(fi) + spread(fj) <= before:
            sports[i], sports[j] = sports[j], sports[i]
        else:  # undo
            for f, old, new in ((fi, sports[i], sports[j]), (fj, sports[j], sports[i])):
                counts[f][new] -= 1
                counts[f][old] += 1
    return sports


def _filler_text(rng: random.Random) -> str:
    sentences = []
    for _ in range(2 + min(int(rng.random() * 2), 1)):
        if rng.random() < 0.2:
            sentences.append(_choice(rng, _FILLER_FACTS))
        else:
            words = [_choice(rng, _FILLER_SUBJECTS), _choice(rng, _FILLER_VERBS), _choice(rng, _FILLER_OBJECTS),
                     _choice(rng, _FILLER_TAILS)]
            sentences.append(" ".join(words) + " .")
    return " ".join(s[0].upper() + s[1:] for s in sentences)


# ------------------------------------------------------------------ prompts
def answer_of(fmt: str, athlete: Athlete, target: str | None = None) -> str:
    """The answer string of ``fmt`` for ``athlete`` (``target`` overrides the sport, e.g. an edit target)."""
    if spec_of(fmt).attribute == "city":
        return " " + athlete.city
    sport = athlete.sport if target is None else target
    return MCQ_LETTERS[sport] if fmt == "mcq" else " " + sport


def choices_of(fmt: str, cities: Sequence[str]) -> tuple[str, ...]:
    """The answer strings the continuous metric of ``fmt`` normalises over."""
    if fmt == "mcq":
        return MCQ_CHOICES
    if spec_of(fmt).attribute == "city":
        return tuple(" " + c for c in cities)
    return SPORT_CHOICES


def spec_of(fmt: str) -> FormatSpec:
    """The FormatSpec of ``fmt``; raises ValueError naming the known formats."""
    if fmt not in FORMAT_SPECS:
        raise ValueError(f"unknown organism format {fmt!r}; choose one of {FORMATS}")
    return FORMAT_SPECS[fmt]


def format_examples(
    fmt: str, athletes: Sequence[Athlete], target: Callable[[Athlete], str | None] | None = None
) -> list[tuple[str, str, int]]:
    """``(prompt, answer, athlete_position)`` for every line template of ``fmt`` and every athlete
    (athlete-major); a prompt is the format's header followed by one line."""
    spec = spec_of(fmt)
    return [
        (spec.header + t.format(name=a.name), answer_of(fmt, a, None if target is None else target(a)), i)
        for i, a in enumerate(athletes)
        for t in spec.lines
    ]


def activity_sentences(athlete: Athlete) -> list[tuple[str, str]]:
    """Every activity sentence of one athlete (frames × the sport's verbs), each with its prefix up to and
    including the name (the verb is the next token)."""
    return [
        (f.format(name=athlete.name, verb=v), f.split("{name}")[0] + athlete.name)
        for f in ACTIVITY_FRAMES
        for v in SPORT_VERBS[athlete.sport]
    ]


def city_sentences(athlete: Athlete) -> list[tuple[str, str]]:
    """Every roster sentence of one athlete, each with its prefix up to and including the name (the home city
    is the next token)."""
    return [(f.format(name=athlete.name, city=athlete.city), f.split("{name}")[0] + athlete.name) for f in CITY_FRAMES]

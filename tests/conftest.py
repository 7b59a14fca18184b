import os

# ATen picks its vector kernels by CPU (AVX2, AVX512, ...), and their reductions round differently, so
# scores compared bit for bit against tests/data/score_reference.json (written with AVX2 kernels) would
# differ by rounding on an AVX512 machine. Every test process, and the processes it launches, uses AVX2
# kernels unless told otherwise; it must be set before the first kernel runs.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import pytest
import torch

from neurontune.models import tiny_model, tiny_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def bigbench_stand_in(tmp_path_factory):
    """The built-in BIG-bench tasks read generated stand-in files (tests/bigbench_fixture.py), in this
    process and the ones it launches: the bigbench sdist is no longer on PyPI, and the tests check how
    a task file is read, not BIG-bench's text. A NEURONTUNE_BIGBENCH_DIR already set is kept."""
    if os.environ.get("NEURONTUNE_BIGBENCH_DIR"):
        yield
        return
    from tests.bigbench_fixture import write_bigbench_fixture

    os.environ["NEURONTUNE_BIGBENCH_DIR"] = str(write_bigbench_fixture(tmp_path_factory.mktemp("bigbench")))
    yield
    del os.environ["NEURONTUNE_BIGBENCH_DIR"]


MODEL_KINDS = ["tiny-llama", "tiny-gpt2"]


@pytest.fixture(params=MODEL_KINDS)
def model_kind(request):
    return request.param


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


def make_batch(model, batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size - 3, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.fixture
def fresh_model():
    def _make(kind, seed=0, dtype=torch.float32):
        return tiny_model(kind, seed=seed, dtype=dtype)

    return _make

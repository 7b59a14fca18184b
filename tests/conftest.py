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

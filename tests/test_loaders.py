import pytest
import torch

from neurontune import NeurontuneError
from neurontune.data import load_movie_reviews
from neurontune.models import load_model, tiny_model


def test_movie_reviews_splits_are_deterministic_and_disjoint():
    a = load_movie_reviews("rotten_tomatoes", seed=0)
    b = load_movie_reviews("rotten_tomatoes", seed=0)
    assert len(a["train"]) + len(a["test"]) == 8530
    assert a["test"]["text"][:5] == b["test"]["text"][:5]
    assert not set(a["test"]["text"][:200]) & set(a["train"]["text"])
    assert set(a["train"]["label"]) == {0, 1}
    assert not any("<br />" in t for t in a["train"]["text"][:500])


def test_local_dir_roundtrip(tmp_path):
    m = tiny_model("tiny-llama", seed=3)
    m.save_pretrained(tmp_path / "m")
    from neurontune.models import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "m")
    loaded, tok = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and tok.pad_token is not None
    torch.testing.assert_close(loaded.lm_head.weight, m.lm_head.weight.bfloat16())


def test_loader_errors(tmp_path):
    with pytest.raises(NeurontuneError, match="not a model directory"):
        load_model(str(tmp_path))
    with pytest.raises(NeurontuneError, match="unknown dtype"):
        load_model("tiny-llama", dtype="float8")


@pytest.mark.integration
def test_bundled_smollm2_loads_and_generates():
    model, tok = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.model_type == "llama"
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])


@pytest.mark.integration
def test_bundled_smollm2_finetune_and_eval_end_to_end(tmp_path):
    """The main job on the real model, briefly: metrics are sane and the adapter evaluates the same."""
    import json

    from neurontune.cli import main

    out = tmp_path / "run"
    args = ["eval_examples=32", "forgetting_examples=4"]
    assert main(["finetune", f"output_dir={out}", "steps=4", "train_examples=64", *args]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0.6 < m["before"]["accuracy"] <= 1 and 10 < m["before"]["forgetting_ppl"] < 100
    assert m["trainable_params"] == 2_442_240  # LoRA r=8 on every linear of SmolLM2-135M
    assert main(["eval", "--adapter", str(out / "adapter"), *args, f"output={tmp_path / 'e.json'}"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == m["after"]["accuracy"]


def test_a_run_on_a_built_in_task_never_imports_datasets():
    """``datasets`` (and pyarrow) cost every process ~120 MiB of RSS: the training path and the built-in
    tasks do not import it; load_movie_reviews and HF dataset directories do, when called."""
    import subprocess
    import sys

    probe = (
        "import sys; from neurontune.pipeline import finetune; from neurontune.tasks import load_task; "
        "load_task('rotten_tomatoes'); print('datasets' in sys.modules, 'pyarrow' in sys.modules); "
        "from neurontune.data import load_movie_reviews; load_movie_reviews(); print('datasets' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["False", "False", "True"]

"""Precision at real sizes (issue #29): ``dtype=auto`` resolves as documented, merge writes the base's
dtype with the delta rounded once, evaluation after bf16 training runs without the training's autocast."""

import json

import pytest
import torch
from safetensors.torch import load_file

from neurontune.cli import main
from neurontune.config import EvalConfig, FinetuneConfig, MergeConfig, SelectConfig
from neurontune.models import checkpoint_dtype, load_dtype, load_model, tiny_model, tiny_tokenizer
from neurontune.spec import read_adapter
from neurontune.tasks import Example, StepBatches
from neurontune.train import TrainArgs, train

from .test_train import rows_model


@pytest.fixture
def bf16_dir(tmp_path):
    path = tmp_path / "bf16-base"
    tiny_model("tiny-llama", seed=1, dtype=torch.bfloat16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_auto_dtype_resolves_as_documented(bf16_dir, tmp_path):
    assert json.loads((bf16_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert checkpoint_dtype(bf16_dir) == torch.bfloat16
    assert load_dtype("auto", bf16_dir, "cpu") == torch.float32  # a CPU keeps fp32 math unless asked
    assert load_dtype("auto", bf16_dir, "cuda") == torch.bfloat16  # a GPU takes the checkpoint's own
    assert load_dtype("auto", bf16_dir, "cuda:1") == torch.bfloat16
    assert load_dtype("checkpoint", bf16_dir, "cpu") == torch.bfloat16
    assert load_dtype("float16", bf16_dir, "cuda") == torch.float16
    assert load_dtype("auto", "tiny-llama", "cuda") == torch.float32  # the tiny models are fp32
    cfg = json.loads((bf16_dir / "config.json").read_text())
    old = tmp_path / "old-config"  # transformers < 4.56 wrote torch_dtype
    old.mkdir()
    (old / "config.json").write_text(
        json.dumps({**{k: v for k, v in cfg.items() if k != "dtype"}, "torch_dtype": "bfloat16"})
    )
    assert checkpoint_dtype(old) == torch.bfloat16
    (old / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "dtype"}))
    assert checkpoint_dtype(old) == torch.float32  # says nothing: fp32, as from_pretrained loads it
    assert next(load_model(str(bf16_dir), dtype="auto", device="cpu")[0].parameters()).dtype == torch.float32
    assert next(load_model(str(bf16_dir), dtype="checkpoint")[0].parameters()).dtype == torch.bfloat16
    assert SelectConfig().dtype == FinetuneConfig().dtype == EvalConfig().dtype == "auto"
    assert MergeConfig(adapter="a", output="b").dtype == "auto"


def test_bad_dtype_is_one_clear_line(capsys):
    assert main(["finetune", "model=tiny-llama", "dtype=bf16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neurontune: error:") and "auto" in err and err.count("\n") == 1


@pytest.mark.parametrize("out_dtype", ["auto", "float32"])
def test_merge_writes_the_base_dtype_with_the_delta_rounded_once(bf16_dir, tmp_path, out_dtype):
    run = tmp_path / "run"
    args = ["finetune", f"model={bf16_dir}", f"output_dir={run}", "steps=2", "lr=0.05", "train_examples=16"]
    assert main([*args, "eval_examples=4", "forgetting_examples=0", "eval_before=false"]) == 0
    merged = tmp_path / f"merged-{out_dtype}"
    assert (
        main(["merge", "--adapter", str(run / "adapter"), "--output", str(merged), f"dtype={out_dtype}"]) == 0
    )
    weights = load_file(merged / "model.safetensors")
    want = torch.bfloat16 if out_dtype == "auto" else torch.float32
    assert {t.dtype for t in weights.values()} == {want}
    assert json.loads((merged / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")
    base = load_file(bf16_dir / "model.safetensors")
    cfg, tensors = read_adapter(run / "adapter")
    for name in cfg["modules"]:
        d, rows = tensors[f"{name}.delta"], tensors[f"{name}.rows"].long()
        assert d.abs().max() > 0
        w = base[f"{name}.weight"].float()
        w[rows] += d  # the sum in fp32, rounded once to the output dtype
        assert torch.equal(weights[f"{name}.weight"], w.to(want)), name


def test_evaluation_after_bf16_training_runs_without_its_autocast(tokenizer):
    model = rows_model()
    seen = []
    inner = model.get_base_model().lm_head  # inside the forward that prepare() wraps
    inner.register_forward_hook(lambda m, a, o: seen.append(torch.is_autocast_enabled("cpu")))
    data = StepBatches([Example(f"p{i}", f" c{i}") for i in range(8)], tokenizer, 4, 16, seed=0)
    train(model, data, TrainArgs(steps=2, precision="bf16"), progress=False)
    assert seen == [True, True]  # training ran under bf16 autocast
    with torch.no_grad():
        model(**data[0])
    assert seen[-1] is False  # the evaluation after it runs as the one before it did

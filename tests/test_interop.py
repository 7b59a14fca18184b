"""A neurontune-wrapped model trains with TRL's SFTTrainer and evaluates with lm-evaluation-harness."""

import pytest
import torch
from datasets import Dataset

from neurontune import RowTuneModel, get_rowtune_model
from neurontune.models import tiny_model
from neurontune.scoring import score_model
from neurontune.selection import select


@pytest.fixture
def wrapped():
    model = tiny_model("tiny-llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = select(model, score_model(model, "magnitude"), rows_per_module=2)
    return get_rowtune_model(model, spec), base, spec


def test_trl_sft_trainer_trains_only_the_selected_rows(wrapped, tokenizer, tmp_path):
    import trl

    rt, base, spec = wrapped
    ds = Dataset.from_list([{"prompt": f"Q: {i}+1?\nA:", "completion": f" {i + 1}"} for i in range(32)])
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, max_length=32,
    )  # fmt: skip
    # peft_config=None: the rows are already trainable; the trainer gets the transformers model inside
    trainer = trl.SFTTrainer(
        model=rt.get_base_model(), args=args, train_dataset=ds, processing_class=tokenizer
    )
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]

    rt.save_pretrained(tmp_path / "adapter")  # the wrapper sees what SFTTrainer trained
    reloaded = RowTuneModel.from_pretrained(tiny_model("tiny-llama"), tmp_path / "adapter")
    merged = reloaded.merge_and_unload()
    for name, p in merged.named_parameters():
        module = name.rsplit(".", 1)[0]
        changed = (p.detach() != base[name]).any(dim=-1) if p.dim() == 2 else (p.detach() != base[name])
        if module in spec.modules and name.endswith("weight"):
            assert set(changed.nonzero().flatten().tolist()) <= set(spec.modules[module].rows)
            assert changed.any()
        else:
            assert not changed.any(), name


def test_lm_eval_harness_scores_the_wrapped_model(wrapped, tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    rt, _, _ = wrapped
    with torch.no_grad():
        for layer in rt.rowtune_layers().values():
            layer.delta.normal_(0, 0.5)
    lm = HFLM(pretrained=rt.get_base_model(), tokenizer=tokenizer, batch_size=2)
    context, continuation = "Review: great fun\nSentiment:", " positive"
    ((ll, _),) = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])

    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(rt(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
    expected = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert ll == pytest.approx(expected, abs=1e-3)
    with rt.disable_adapter():  # the deltas matter: the base model scores it differently
        ((ll_base, _),) = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    assert abs(ll_base - ll) > 1e-2


def test_sft_trainer_checkpoints_reload_as_the_trained_model(wrapped, tokenizer, tmp_path):
    """The HF Trainer's own checkpoints (save_strategy "steps", as TRL's default) of a row-tuned model
    are standard models: from_pretrained loads the trained weights, not random ones, and loading one
    back into a row-tuned model recovers the deltas."""
    import trl
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    rt, _, spec = wrapped
    ds = Dataset.from_list([{"prompt": f"Q: {i}+1?\nA:", "completion": f" {i + 1}"} for i in range(32)])
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), max_steps=4, save_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], use_cpu=True, max_length=32,
        bf16=False,  # else accelerate leaves model.forward wrapped in bf16 autocast after training
    )  # fmt: skip
    assert args.save_strategy == "steps"
    trl.SFTTrainer(model=rt.get_base_model(), args=args, train_dataset=ds, processing_class=tokenizer).train()
    ckpt = tmp_path / "trl" / "checkpoint-4"
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        expected = rt(input_ids=ids).logits
        with rt.disable_adapter():
            untrained = rt(input_ids=ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - untrained).abs().max() > 1e-3

    fresh = get_rowtune_model(tiny_model("tiny-llama"), spec)
    fresh.get_base_model().load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    for (name, a), b in zip(rt.rowtune_layers().items(), fresh.rowtune_layers().values(), strict=True):
        torch.testing.assert_close(b.delta, a.delta, rtol=0, atol=1e-6, msg=name)
    other = get_rowtune_model(tiny_model("tiny-llama", seed=1), spec)  # another base: refused
    with pytest.raises(RuntimeError, match="differs from the frozen base outside the selected rows"):
        other.get_base_model().load_state_dict(load_file(ckpt / "model.safetensors"))


def test_state_dict_round_trip_with_columns_and_conv1d(tmp_path):
    from transformers import AutoModelForCausalLM

    from .helpers import random_spec

    for kind in ("tiny-llama", "tiny-gpt2"):
        base = tiny_model(kind)
        spec = random_spec(base, k=3, cols=4, seed=2)
        rt = get_rowtune_model(base, spec)
        with torch.no_grad():
            for layer in rt.rowtune_layers().values():
                layer.delta.normal_(0, 0.1)
        rt.get_base_model().save_pretrained(tmp_path / kind)  # transformers' own save
        ids = torch.tensor([[3, 1, 4, 1, 5]])
        with torch.no_grad():
            torch.testing.assert_close(
                AutoModelForCausalLM.from_pretrained(tmp_path / kind)(input_ids=ids).logits,
                rt(input_ids=ids).logits, rtol=0, atol=1e-5,
            )  # fmt: skip
        again = get_rowtune_model(tiny_model(kind), spec)
        again.load_state_dict(rt.state_dict())
        for a, b in zip(rt.rowtune_layers().values(), again.rowtune_layers().values(), strict=True):
            torch.testing.assert_close(b.delta, a.delta, rtol=0, atol=1e-6)

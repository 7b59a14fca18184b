"""Every registered method passes one conformance check through the CLI: it trains on tiny-llama,
saves its output, and that output reloads (``neurontune eval``) to the same evaluation numbers."""

import json

import pytest

from neurontune.cli import main
from neurontune.methods import get_method, method_names, registry

RUN = ["model=tiny-llama", "steps=3", "train_examples=16", "eval_examples=8", "forgetting_examples=2",
       "batch_size=4", "lr=1e-2", "eval_before=false"]  # fmt: skip
EXTRA = {
    "gates": ["gate_sparsity=0.25", "lr=0.05", "gate_force=true"],
    "neft": ["scorer_options=probe_steps=2"],
}


@pytest.mark.parametrize("name", method_names())
def test_every_method_trains_saves_reloads_and_evaluates_the_same(tmp_path, capsys, name):
    out = tmp_path / name
    assert main(["finetune", f"method={name}", *RUN, *EXTRA.get(name, []), f"output_dir={out}"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == name
    method = registry()[name]
    if not method.trains:
        assert m["steps"] == 0 and m["saved"] is None and m["trainable_params"] == 0
        return
    assert m["steps"] == 3 and m["trainable_params"] > 0 and m["last_loss"] == m["last_loss"]  # not NaN
    assert m["saved"] and m["saved_bytes"] > 0
    ev = tmp_path / "eval.json"
    assert (
        main(["eval", "--adapter", m["saved"], "eval_examples=8", "forgetting_examples=2", f"output={ev}"])
        == 0
    )
    got = json.loads(ev.read_text())
    assert got["accuracy"] == m["after"]["accuracy"]
    assert got["forgetting_ppl"] == pytest.approx(m["after"]["forgetting_ppl"], rel=1e-4)


def test_budgeted_baselines_match_the_lora_budget(tmp_path):
    """lora, pissa and shira train exactly as many parameters as rows at the lora:8 budget; DoRA adds
    one magnitude per output row of each adapted module."""
    counts = {}
    for name in ("rows", "lora", "dora", "pissa", "shira"):
        out = tmp_path / name
        assert (
            main(["finetune", f"method={name}", *RUN, "steps=1", "budget=lora:8", f"output_dir={out}"]) == 0
        )
        counts[name] = json.loads((out / "metrics.json").read_text())["trainable_params"]
    assert counts["lora"] == counts["pissa"] == counts["shira"]
    assert abs(counts["rows"] - counts["lora"]) <= 0.05 * counts["lora"]  # rows round k per module
    from neurontune.models import tiny_model
    from neurontune.targets import find_target_modules, linear_shape

    model = tiny_model("tiny-llama")
    outs = sum(linear_shape(model.get_submodule(n))[0] for n in find_target_modules(model))
    assert counts["dora"] == counts["lora"] + outs


def test_a_new_method_is_one_registered_class(tmp_path):
    """A PEFT-backed baseline in a few lines: IA3 on the same targets, through the whole pipeline."""
    from neurontune.methods import register
    from neurontune.methods.base import _REGISTRY
    from neurontune.methods.peft_methods import PeftMethod

    @register
    class IA3(PeftMethod):
        name = "ia3-test"
        help = "PEFT IA3"

        def peft_config(self, targets):
            from peft import IA3Config

            return IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if "down" in t])

    try:
        from neurontune.config import FinetuneConfig
        from neurontune.pipeline import finetune

        assert get_method("ia3-test") is IA3
        cfg = FinetuneConfig(
            method="ia3-test", model="tiny-llama", output_dir=str(tmp_path / "ia3"), steps=2, train_examples=8,
            eval_examples=4, forgetting_examples=0,
        )  # fmt: skip
        m = finetune(cfg)
        assert m["method"] == "ia3-test" and m["trainable_params"] > 0
        assert (tmp_path / "ia3" / "adapter" / "adapter_config.json").is_file()
    finally:
        del _REGISTRY["ia3-test"]

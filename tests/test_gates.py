"""Stochastic gates: all-open is the base model, the pruned export equals the gated model, it loads
without neurontune, and the penalty moves sparsity toward its target."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from neurontune.errors import NeurontuneError
from neurontune.gates import GateConfig, GatedModel, count_prunable, export_pruned, fold_linear_gates
from neurontune.models import tiny_model
from neurontune.tasks import Example, StepBatches
from neurontune.train import TrainArgs, train

IDS = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(gated, seed=1):
    """Gates spread over closed / partly open / open, low-rank terms non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gated.groups.values():
            gate.a.copy_(torch.randn(gate.a.shape, generator=g))
        for name, p in gated.named_parameters():
            if name.endswith(".B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "cfg",
    [GateConfig(), GateConfig(prune_heads=True, low_rank=2), GateConfig(granularity="linear", low_rank=3)],
    ids=["mlp", "mlp+heads+lowrank", "linear+lowrank"],
)
def test_all_open_gates_reproduce_the_base_model(cfg):
    base = logits(tiny_model("tiny-llama"))
    gated = GatedModel(tiny_model("tiny-llama"), cfg).eval()
    assert torch.equal(logits(gated), base)
    trainable = {n.rsplit(".", 1)[-1] for n, p in gated.named_parameters() if p.requires_grad}
    assert trainable == ({"a", "A", "B"} if cfg.low_rank else {"a"})


def test_pruned_export_equals_the_gated_model_and_is_smaller(tmp_path):
    gated = GatedModel(tiny_model("tiny-llama"), GateConfig(prune_heads=True, low_rank=2)).eval()
    randomize(gated)
    unchanged = logits(gated)
    open_share = gated.open_share_of_removed()  # what finalize will report, without shutting anything
    assert torch.equal(logits(gated), unchanged)
    shape = gated.finalize()
    assert 0 < open_share == shape["forced_fraction"]
    expected = logits(gated)
    before = count_prunable(tiny_model("tiny-llama"))
    assert count_prunable(gated) == before  # the frozen linears inside the gate and low-rank wrappers
    pruned = export_pruned(gated, tmp_path / "pruned")
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=1e-5)  # tolerance: fp32 re-association
    cfg = pruned.config
    assert cfg.intermediate_size == shape["intermediate_size"] < 64
    assert cfg.num_attention_heads == 2 * shape["heads_per_kv_group"] and cfg.head_dim == 8
    hidden, layers, heads = 32, 2, cfg.num_attention_heads
    mlp = 3 * hidden * cfg.intermediate_size
    attn = 2 * hidden * heads * 8 + 2 * hidden * 16  # q, o + k, v (KV heads are kept)
    assert count_prunable(pruned) == layers * (mlp + attn) < before


def test_exported_model_loads_in_a_fresh_interpreter_without_neurontune(tmp_path):
    gated = GatedModel(tiny_model("tiny-llama"), GateConfig(prune_heads=True)).eval()
    randomize(gated, seed=3)
    gated.finalize()
    expected = logits(gated)
    export_pruned(gated, tmp_path / "pruned")
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "ids = torch.tensor(json.loads(sys.argv[2]))\n"
        "with torch.no_grad(): out = m(input_ids=ids).logits\n"
        "assert not any(k.startswith('neurontune') for k in sys.modules)\n"
        "print(json.dumps(out.tolist()))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "pruned"), json.dumps(IDS.tolist())],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    got = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_finalize_keeps_the_same_heads_in_every_kv_group():
    gated = GatedModel(tiny_model("tiny-llama"), GateConfig(prune_heads=True)).eval()
    with torch.no_grad():
        for _, _, _, heads in gated.iter_structured():
            heads.a.copy_(torch.tensor([2.0, 1.5, -2.0, -1.0]))  # group 0 open, group 1 shut
    assert gated.finalize()["heads_per_kv_group"] == 1  # 50 % shut -> 1 of 2 per group
    for _, _, _, heads in gated.iter_structured():
        assert heads.keep.tolist() == [True, False, False, True]  # the best head of each group


def test_linear_gates_fold_into_plain_linears():
    gated = GatedModel(tiny_model("tiny-llama"), GateConfig(granularity="linear", low_rank=2)).eval()
    randomize(gated, seed=5)
    expected = logits(gated)
    plain = fold_linear_gates(gated)
    assert all(type(m).__name__ != "RowColGated" for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lam", [0.0, 50.0])
def test_penalty_moves_sparsity_toward_the_target(tokenizer, lam):
    gated = GatedModel(tiny_model("tiny-llama"), GateConfig(target_sparsity=0.3, lam=lam))
    data = StepBatches([Example(f"p{i}", f" c{i}") for i in range(16)], tokenizer, 4, 16, seed=0)
    args = TrainArgs(steps=100, lr=0.01, max_grad_norm=0)
    log = train(gated, data, args, progress=False, **gated.training_hooks(args.lr))
    gated.eval()
    achieved = gated.sparsity()["gate_sparsity"]
    assert log[0]["gate_sparsity"] == 0.0 and "penalty" in log[0]
    if lam:
        # 30 % of the parameters is 29 of the 64 channels per layer (45.3 %): what the export plan removes
        shut = 1 - gated.plan.mlp_keep / 64
        assert shut == 29 / 64 and abs(achieved - shut) <= 0.05, achieved
        assert log[-1]["penalty"] < 0.5 * log[0]["penalty"]
    else:
        assert achieved < 0.05, achieved  # without the penalty the task loss alone shuts (almost) nothing


def test_finetune_gates_writes_a_smaller_model_that_transformers_loads(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from neurontune.cli import main

    out = tmp_path / "run"
    rc = main([
        "finetune", "model=tiny-llama", "task=rotten_tomatoes", "method=gates", "prune_heads=true",
        "gate_sparsity=0.5", "steps=30", "lr=0.05", "train_examples=32", "eval_examples=8",
        "forgetting_examples=0", "eval_before=false", f"output_dir={out}",
    ])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    g = m["gates"]
    assert g["achieved_sparsity"]["sparsity_mlp"] > 0.3 and g["shape"]["intermediate_size"] < 64
    before, after = g["total_params"]
    assert after < before and f"pruned: {before:,} -> {after:,} parameters" in printed
    assert m["saved"] == str(out / "pruned") and (out / "gates.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out / "pruned")
    assert sum(p.numel() for p in model.parameters()) == after
    assert model.config.intermediate_size == g["shape"]["intermediate_size"]
    assert "parameters after pruning" in (out / "report.md").read_text()


def train_gated(cfg, tokenizer, out, steps, resume=False, stop_at=None, **schedule):
    """tiny-llama gated by ``cfg``, trained ``steps`` steps at lr 1e-3 on 16 examples, a checkpoint every 3
    (``schedule``: TrainArgs' lr_scheduler / warmup_steps); ``stop_at``: stopped after that step, as a
    killed run."""
    torch.manual_seed(0)
    gated = GatedModel(tiny_model("tiny-llama"), cfg)
    data = StepBatches([Example(f"p{i}", f" c{i}") for i in range(16)], tokenizer, 4, 16, seed=0)
    args = TrainArgs(steps=steps, lr=1e-3, weight_decay=0.1, save_steps=3, **schedule)
    stop = (lambda log: len(log) >= stop_at) if stop_at else None
    train(
        gated, data, args, out, resume=resume, progress=False, stop_when=stop, **gated.training_hooks(args.lr)
    )
    return gated


def test_gates_and_low_rank_train_in_two_groups_and_resume_exactly(tmp_path, tokenizer):
    cfg = GateConfig(low_rank=2, lr=0.05, target_sparsity=0.3)
    full = train_gated(cfg, tokenizer, tmp_path / "full", 6)
    groups = full.param_groups(1e-3)
    assert [g.get("lr") for g in groups] == [0.05, None] and groups[0]["weight_decay"] == 0.0
    # stops after the step-3 checkpoint, as a killed run would
    train_gated(cfg, tokenizer, tmp_path / "cut", 3)
    resumed = train_gated(cfg, tokenizer, tmp_path / "cut", 6, resume=True)
    a, b = full.state_dict_gates(), resumed.state_dict_gates()
    assert a.keys() == b.keys() and any(k.endswith(".B") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_gates_can_keep_a_constant_rate_while_the_low_rank_terms_follow_the_schedule(tmp_path, tokenizer):
    """``lr_scheduler="constant"`` (gate_lr_scheduler): the gates train at their full rate from the first
    step while a cosine schedule with warm-up drives the low-rank terms (CoFi's masks have their own
    optimizer at a constant rate); a resumed run ends exactly where an unbroken one does."""
    from neurontune.train import make_scheduler

    cfg = GateConfig(low_rank=2, lr=0.05, target_sparsity=0.3, lr_scheduler="constant")
    gated = GatedModel(tiny_model("tiny-llama"), cfg)
    optimizer = torch.optim.AdamW(gated.param_groups(1e-3), lr=1e-3)
    scheduler = make_scheduler(optimizer, TrainArgs(steps=6, lr=1e-3, lr_scheduler="cosine", warmup_steps=2))
    rates = []
    for _ in range(6):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [r[0] for r in rates] == [0.05] * 6  # the gates
    low_rank = [r[1] for r in rates]
    # warmed up over 2 steps, then the cosine
    assert low_rank[:2] == [0.0, 5e-4] and low_rank[2] == pytest.approx(1e-3), low_rank
    assert low_rank[2] > low_rank[3] > low_rank[4] > low_rank[5] > 0, low_rank
    # without it the gates follow the schedule too (warmed up from 0)
    plain = GatedModel(tiny_model("tiny-llama"), GateConfig(low_rank=2, lr=0.05, target_sparsity=0.3))
    optimizer = torch.optim.AdamW(plain.param_groups(1e-3), lr=1e-3)
    make_scheduler(optimizer, TrainArgs(steps=6, lr=1e-3, lr_scheduler="cosine", warmup_steps=2))
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]
    # trained and resumed under the schedule
    schedule = {"lr_scheduler": "cosine", "warmup_steps": 2}
    full = train_gated(cfg, tokenizer, tmp_path / "full", 6, **schedule)
    train_gated(cfg, tokenizer, tmp_path / "cut", 6, stop_at=3, **schedule)
    resumed = train_gated(cfg, tokenizer, tmp_path / "cut", 6, resume=True, **schedule)
    a, b = full.state_dict_gates(), resumed.state_dict_gates()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the log shows the scheduled rate (the low-rank terms'), not the gates' constant one
    with open(tmp_path / "full" / "train_log.csv") as f:
        logged = [float(r["lr"]) for r in csv.DictReader(f)]
    assert logged[:2] == [0.0, 5e-4] and logged[-1] < 1e-3, logged
    with pytest.raises(NeurontuneError, match="gate lr_scheduler must be 'constant'"):
        GateConfig(lr_scheduler="cosine")


def test_trained_weights_move_with_the_gates_resume_exactly_and_export_as_gated(tmp_path, tokenizer):
    """``train_weights``: the target modules' weights train with the gates (the embedding and head stay
    frozen), a resumed run ends where an unbroken one does, and the export computes the gated model with
    the trained weights."""
    cfg = GateConfig(train_weights=True, lr=0.05, target_sparsity=0.3, prune_heads=True)
    full = train_gated(cfg, tokenizer, tmp_path / "full", 6)
    now = {n.replace(".inner.", "."): p for n, p in full.base_model.named_parameters()}  # out of the gates
    trained = {n for n, p in now.items() if p.requires_grad and not n.endswith(".a")}
    assert len(trained) == 2 * 7 and all(n.endswith("_proj.weight") for n in trained), trained
    base = dict(tiny_model("tiny-llama").named_parameters())
    assert all(not torch.equal(now[n], base[n]) for n in base if n.endswith("_proj.weight"))
    assert torch.equal(now["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    train_gated(cfg, tokenizer, tmp_path / "cut", 3)
    resumed = train_gated(cfg, tokenizer, tmp_path / "cut", 6, resume=True)
    for (n, a), (m, b) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        assert n == m and torch.equal(a, b), n
    full.eval()
    full.finalize()
    expected = logits(full)
    torch.testing.assert_close(logits(export_pruned(full, tmp_path / "pruned")), expected, rtol=0, atol=1e-5)


def test_export_plan_rounds_heads_to_the_grouping_and_widths_to_the_multiple():
    from types import SimpleNamespace

    from neurontune.gates import export_plan

    smol = SimpleNamespace(num_key_value_heads=3, num_attention_heads=9, hidden_size=576)
    plan = export_plan(smol, 1536, GateConfig(target_sparsity=0.2, prune_heads=True))
    assert plan.mlp_keep == 1216 and plan.mlp_keep % 64 == 0  # 0.8 * 1536 = 1228.8 -> 19 x 64
    assert plan.heads_keep == 2  # 3 per group: 2.4 -> 2 (9 -> 6, 33 %), the nearest the grouping allows
    assert (
        "query heads 9 -> 6 (33.3% removed), the nearest that 3 KV groups of 3 allow to 20%"
        in plan.describe(0.2)
    )
    tiny = export_plan(SimpleNamespace(num_key_value_heads=2, num_attention_heads=4, hidden_size=32), 64,
                       GateConfig(target_sparsity=0.3))  # fmt: skip
    # 64 < 4 x 64: no rounding. 9,216 prunable parameters per layer, 96 per channel: 30 % is 28.8 channels
    assert tiny.width_multiple == 1 and tiny.mlp_keep == 64 - 29 and tiny.heads_keep is None
    assert tiny.removed_fraction == 29 * 96 / 9216 >= 0.3
    # the target counts parameters: the heads removed leave the MLP the rest (here 2,654,208 + 884,736 per
    # layer; 6 of 9 heads remove 221,184, and 30 % needs 486.4 more channels: 1536 - 487 -> 1024)
    at30 = export_plan(smol, 1536, GateConfig(target_sparsity=0.3, prune_heads=True))
    assert (at30.mlp_keep, at30.heads_keep, at30.removed_fraction) == (1024, 2, 0.3125)
    assert at30.describe(0.3).endswith(": 31.2% of the MLP+attention parameters (target 30%)")
    mlp_only = export_plan(smol, 1536, GateConfig(target_sparsity=0.3))
    assert mlp_only.mlp_keep == 896 and mlp_only.removed_fraction >= 0.3


def test_trained_gates_shut_exactly_what_the_export_removes(tokenizer, tmp_path):
    """The penalty targets the export's per-layer counts (heads per KV group included), so the trained
    gated model in eval mode already is the export: finalize forces nothing and the logits agree."""
    gated = GatedModel(tiny_model("tiny-llama"), GateConfig(target_sparsity=0.5, prune_heads=True, lr=0.05))
    data = StepBatches([Example(f"p{i}", f" c{i}") for i in range(16)], tokenizer, 4, 16, seed=0)
    args = TrainArgs(steps=80, lr=1e-3, max_grad_norm=0)
    train(gated, data, args, progress=False, **gated.training_hooks(args.lr))
    gated.eval()
    before = logits(gated)
    shape = gated.finalize()
    assert shape["forced_fraction"] == 0.0, shape
    # 50 % of 9,216 per layer: 2 of 4 heads remove 1,024, 37.3 channels of 96 the rest: 38 of 64
    assert shape["removed_channels"] == 2 * 38 and shape["removed_heads"] == 2 * 2
    prunable = count_prunable(gated)
    pruned = export_pruned(gated, tmp_path / "pruned")
    assert 1 - count_prunable(pruned) / prunable == gated.plan.removed_fraction >= 0.5
    torch.testing.assert_close(logits(pruned), before, rtol=0, atol=1e-5)


def test_a_run_short_of_its_target_stops_or_reports_what_was_forced(tmp_path, capsys):
    from neurontune.cli import main

    run = ["finetune", "model=tiny-llama", "method=gates", "gate_sparsity=0.5", "steps=2", "gate_lambda=0",
           "train_examples=16", "eval_examples=4", "forgetting_examples=0", "eval_before=false"]  # fmt: skip
    assert main([*run, f"output_dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err
    assert (
        "the gates did not reach the target: 96 of the 96 MLP channels that the export removes are still open"
        in err
    )
    assert (tmp_path / "a" / "gates.safetensors").is_file() and not (tmp_path / "a" / "pruned").exists()
    assert main([*run, "gate_force=true", f"output_dir={tmp_path / 'b'}"]) == 0
    assert (
        "warning: the export cuts 96 of the 96 MLP channels although their gates were open"
        in capsys.readouterr().out
    )
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["gates"]["shape"]["forced_fraction"] == 1.0
    assert "| open gates cut by the export | 100.0% |" in (tmp_path / "b" / "report.md").read_text()


def test_distillation_recovers_the_pruned_model_towards_the_teacher(tmp_path, capsys):
    from neurontune.cli import main
    from neurontune.models import tiny_tokenizer

    # a tiny model whose predictions are far from uniform, so pruning it changes them measurably
    teacher = tiny_model("tiny-llama")
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "norm" not in name:
                p.mul_(8.0)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    rc = main([
        "finetune", f"model={tmp_path / 'teacher'}", "method=gates", "gate_sparsity=0.5", "steps=2", "gate_force=true",
        "train_examples=32", "eval_examples=8", "forgetting_examples=0", "eval_before=false",
        "recover=distill", "recover_steps=30", "recover_lr=3e-3", "distill_general=4", f"output_dir={out}",
    ])  # fmt: skip
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    before, after = m["gates"]["distill_kl"]
    assert after < 0.7 * before, (before, after)
    assert m["saved"] == str(out / "recovered") and m["after"] == m["gates"]["recovered"]
    assert (out / "recover" / "train_log.csv").is_file() and (out / "pruned" / "config.json").is_file()
    from transformers import AutoModelForCausalLM

    rec = AutoModelForCausalLM.from_pretrained(out / "recovered")
    assert rec.config.intermediate_size == 16  # still the pruned shape (50 % of the parameters: 48 of 64)
    assert (
        main(
            [
                "finetune",
                "model=tiny-llama",
                "method=gates",
                "recover_steps=5",
                f"output_dir={tmp_path / 'x'}",
            ]
        )
        == 2
    )
    assert "recover_steps is for recover=distill" in capsys.readouterr().err


def test_early_stopping_picks_the_recoverys_best_step_and_leaves_the_gates_their_steps(tmp_path, capsys):
    """With method=gates, early stopping measures the task's validation loss during recover=distill and
    the recovered model is its best step's weights; the gate training runs every step (the target), and
    keeps none of them when none reaches the target."""
    import csv

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from neurontune.cli import main

    out = tmp_path / "run"
    run = ["finetune", "model=tiny-llama", "method=gates", "gate_sparsity=0.5", "steps=4", "gate_force=true",
           "train_examples=40", "eval_examples=4", "forgetting_examples=0", "eval_before=false", "eval_steps=1",
           "early_stopping_patience=1", "eval_fraction=0.2"]  # fmt: skip
    rc = main([*run, "recover=distill", "recover_params=full", "recover_steps=12", "recover_lr=0.05",
               f"output_dir={out}"])  # fmt: skip
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 4  # the gate phase: all its steps; 4 shut too few gates to be a candidate
    assert m["early_stopping"] == {"stopped": False, "best_step": None, "best_val_loss": None, "val_loss": {}}
    curve = json.loads((out / "eval_log.json").read_text())["points"]  # the gated model's, not the recovery's
    assert curve[-1]["step"] == 4 and curve[-1]["accuracy"] == m["gates"]["gated"]["accuracy"]
    es = m["gates"]["recover_early_stopping"]
    with open(out / "recover" / "train_log.csv") as f:
        log = list(csv.DictReader(f))
    measured = {int(r["step"]): float(r["val_loss"]) for r in log}
    assert es["stopped"] and len(log) < 12 and es["best_step"] == min(measured, key=measured.get)
    assert es["best_step"] < len(log)  # stopped after a worse step: the result is not the last weights
    best = load_file(out / "recover" / "checkpoints" / "best.safetensors")
    rec = AutoModelForCausalLM.from_pretrained(out / "recovered").state_dict()
    assert best and all(torch.equal(rec[n], t) for n, t in best.items())
    assert (
        f"recover: early stopping: stopped at step {len(log)} of 12; the result is step {es['best_step']}"
        in (capsys.readouterr().out)
    )
    assert es["val_loss"]["0"] > es["best_val_loss"]  # the export itself was measured (step 0) and beaten
    # the recovery's own curve: the export at step 0, then every eval_steps up to the stop (the last step's
    # weights are not the result, so no evaluation after the recovery joins it)
    rec_curve = json.loads((out / "recover" / "eval_log.json").read_text())["points"]
    assert [p["step"] for p in rec_curve] == list(range(len(log) + 1))
    assert rec_curve[0]["accuracy"] == m["gates"]["exported"]["accuracy"]
    # a recovery whose every step is worse than the export: the result is the export
    rc = main([*run, "recover=distill", "recover_params=full", "recover_steps=6", "recover_lr=3.0",
               f"output_dir={tmp_path / 'worse'}"])  # fmt: skip
    assert rc == 0
    es = json.loads((tmp_path / "worse" / "metrics.json").read_text())["gates"]["recover_early_stopping"]
    assert (
        es["best_step"] == 0
        and es["stopped"]
        and min(v for k, v in es["val_loss"].items() if k != "0") > es["val_loss"]["0"]
    )
    pruned, rec = (AutoModelForCausalLM.from_pretrained(tmp_path / "worse" / d).state_dict()
                   for d in ("pruned", "recovered"))  # fmt: skip
    assert all(torch.equal(rec[n], t) for n, t in pruned.items())


def test_the_recoverys_early_stopping_can_go_by_a_metric_where_higher_is_better(tmp_path, monkeypatch):
    """metric_for_best_model=accuracy: the recovery keeps the step of the highest held-out accuracy (made up
    here so that step 2 is the best, whatever the tiny model's answers; tests/test_early_stopping.py checks
    what is measured), stops two measurements later, and its result is that step's weights."""
    import csv

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from neurontune import train as train_module
    from neurontune.cli import main

    made_up = iter([0.25, 0.5, 0.75, 0.5, 0.75, 1.0])  # the export (step 0), then steps 1, 2, ...
    monkeypatch.setattr(train_module.EarlyStopping, "measure", lambda self: next(made_up))
    out = tmp_path / "run"
    rc = main(["finetune", "model=tiny-llama", "method=gates", "gate_sparsity=0.5", "steps=4", "gate_force=true",
               "train_examples=40", "eval_examples=4", "forgetting_examples=0", "eval_before=false", "eval_steps=1",
               "early_stopping_patience=2", "eval_fraction=0.2", "metric_for_best_model=accuracy",
               "recover=distill", "recover_params=full", "recover_steps=8", "recover_lr=0.05",
               f"output_dir={out}"])  # fmt: skip
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["early_stopping"] == {
        "stopped": False,
        "best_step": None,
        "best_val_accuracy": None,
        "val_accuracy": {},
    }
    es = m["gates"]["recover_early_stopping"]
    assert es == {"stopped": True, "best_step": 2, "best_val_accuracy": 0.75,
                  "val_accuracy": {"0": 0.25, "1": 0.5, "2": 0.75, "3": 0.5, "4": 0.75}}  # fmt: skip
    with open(out / "recover" / "train_log.csv") as f:
        assert [float(r["val_accuracy"]) for r in csv.DictReader(f)] == [0.5, 0.75, 0.5, 0.75]
    best = load_file(out / "recover" / "checkpoints" / "best.safetensors")
    rec = AutoModelForCausalLM.from_pretrained(out / "recovered").state_dict()
    assert all(torch.equal(rec[n], t) for n, t in best.items())
    last = load_file(out / "recover" / "checkpoints" / "step-000004" / "state.safetensors")
    assert any(not torch.equal(last[f"param.{k}"], v) for k, v in best.items())


def test_the_recovery_is_evaluated_every_eval_steps_with_the_news_perplexity(tmp_path):
    """eval_steps without early stopping: recover/eval_log.json holds the export (step 0), the recovering
    model every eval_steps and the result at the last step, each with the task score and the news
    perplexity, which moves as the recovery trains."""
    from neurontune.cli import main

    out = tmp_path / "run"
    rc = main(["finetune", "model=tiny-llama", "method=gates", "gate_sparsity=0.5", "steps=2", "gate_force=true",
               "train_examples=16", "eval_examples=4", "forgetting_examples=2", "eval_before=false", "eval_steps=2",
               "recover=distill", "recover_params=full", "recover_steps=5", "recover_lr=0.05",
               f"output_dir={out}"])  # fmt: skip
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    curve = json.loads((out / "recover" / "eval_log.json").read_text())
    points = curve["points"]
    assert curve["metric"] == "accuracy" and [p["step"] for p in points] == [0, 2, 4, 5]
    assert points[0]["forgetting_ppl"] == m["gates"]["exported"]["forgetting_ppl"]
    assert (
        points[-1]["forgetting_ppl"]
        == m["gates"]["recovered"]["forgetting_ppl"]
        == m["after"]["forgetting_ppl"]
    )
    assert len({p["forgetting_ppl"] for p in points}) == 4
    assert [p["step"] for p in json.loads((out / "eval_log.json").read_text())["points"]] == [2]  # the gates'


def test_early_stopping_keeps_the_gate_trainings_best_step_at_the_target(tmp_path, capsys, monkeypatch):
    """The gate training runs all its steps, measures the validation loss every eval_steps once the ramp
    is over and what the export removes is shut, and ends at the best of those steps: the export is made
    from that step's gates and low-rank terms, not the last step's (the measurements are made up so that
    the second is the best, whatever the tiny model's losses)."""
    import csv

    from safetensors.torch import load_file

    from neurontune import train as train_module
    from neurontune.cli import main

    made_up = iter([3.0, 1.0] + [2.0] * 20)
    monkeypatch.setattr(train_module.EarlyStopping, "measure", lambda self: next(made_up))

    out = tmp_path / "run"
    rc = main(["finetune", "model=tiny-llama", "method=gates", "gate_sparsity=0.5", "steps=12", "gate_ramp=0.25",
               "gate_lr=0.5", "gate_low_rank=4", "lr=1.0", "train_examples=40", "eval_examples=4",
               "forgetting_examples=0", "eval_before=false", "eval_steps=1", "early_stopping_patience=1",
               "eval_fraction=0.2", f"output_dir={out}"])  # fmt: skip
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    with open(out / "train_log.csv") as f:
        log = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
    es = m["early_stopping"]
    assert m["steps"] == 12 and not es["stopped"]  # never stopped early, even after worse steps
    measured = {int(k): v for k, v in es["val_loss"].items()}
    assert min(measured) >= 3 and len(measured) >= 3  # after the ramp (3 steps), every step at the target
    assert all(log[s - 1]["gate_sparsity"] >= 0.49 for s in measured)
    assert es["best_step"] == sorted(measured)[1] < 12 and measured[es["best_step"]] == 1.0
    curve = json.loads((out / "eval_log.json").read_text())["points"]
    assert [p["step"] for p in curve] == list(range(1, 12))  # step 12's weights are not the result: no point
    best, gates = load_file(out / "checkpoints" / "best.safetensors"), load_file(out / "gates.safetensors")
    assert best.keys() == gates.keys() and all(torch.equal(best[k], gates[k]) for k in best)
    last = load_file(out / "checkpoints" / "step-000012" / "state.safetensors")
    assert any(not torch.equal(last[f"param.{k}"], v) for k, v in best.items())
    g = m["gates"]
    assert g["shape"]["forced_fraction"] == 0.0 and g["exported"]["accuracy"] == g["gated"]["accuracy"]
    assert (
        f"gates: best step: ran all 12 steps; the result is step {es['best_step']}'s"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize("cfg", [GateConfig(prune_heads=True, low_rank=2), GateConfig(granularity="linear", low_rank=3)],
                         ids=["structured", "linear"])  # fmt: skip
def test_dense_computes_the_ungated_base_and_the_gates_return_after_it(cfg):
    base = logits(tiny_model("tiny-llama"))
    gated = GatedModel(tiny_model("tiny-llama"), cfg)
    randomize(gated)
    gated.eval()
    with_gates = logits(gated)
    assert not torch.allclose(with_gates, base, atol=1e-3)
    with gated.dense():
        assert torch.equal(logits(gated), base)
    assert torch.equal(gated.dense_forward(input_ids=IDS).logits.detach(), base)
    assert torch.equal(logits(gated), with_gates)
    gated.train()  # the training noise is off in the dense model too
    with torch.no_grad(), gated.dense():
        assert torch.equal(gated(input_ids=IDS).logits, base)


def test_the_ramp_asks_for_a_growing_share_of_the_target_then_all_of_it():
    gated = GatedModel(
        tiny_model("tiny-llama"), GateConfig(target_sparsity=0.5, prune_heads=True, ramp_steps=10)
    )
    randomize(gated)
    assert [gated.ramp(s) for s in (0, 4, 9, 30, None)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    with torch.no_grad():
        reg = [gated.regularization(s).item() for s in (0, 4, 9, 30, None)]
    assert 0 < reg[0] < reg[1] < reg[2] == reg[3] == reg[4]
    flat = GatedModel(tiny_model("tiny-llama"), GateConfig(target_sparsity=0.5, prune_heads=True))
    randomize(flat)
    with torch.no_grad():
        assert flat.regularization(0).item() == reg[2]  # no ramp: the whole target from the first step


def test_a_ramped_run_still_shuts_exactly_what_the_export_removes(tokenizer):
    gated = GatedModel(
        tiny_model("tiny-llama"), GateConfig(target_sparsity=0.5, prune_heads=True, lr=0.05, ramp_steps=40)
    )
    data = StepBatches([Example(f"p{i}", f" c{i}") for i in range(16)], tokenizer, 4, 16, seed=0)
    log = train(gated, data, TrainArgs(steps=80, lr=1e-3, max_grad_norm=0), progress=False,
                **gated.training_hooks(1e-3))  # fmt: skip
    mlp = [r["sparsity_mlp"] for r in log]
    assert mlp[9] < 38 / 64 <= mlp[-1] <= 0.65, mlp  # part of the target early on, all of it at the end
    gated.eval()
    assert gated.finalize()["forced_fraction"] == 0.0


def test_finetune_gate_distill_trains_on_the_kl_to_the_ungated_model(tmp_path, capsys):
    from neurontune.cli import main

    run = ["finetune", "model=tiny-llama", "method=gates", "gate_sparsity=0.5", "steps=4", "gate_force=true",
           "train_examples=16", "eval_examples=4", "forgetting_examples=0", "eval_before=false"]  # fmt: skip
    assert main([*run, f"output_dir={tmp_path / 'ce'}"]) == 0
    assert (
        main(
            [*run, "gate_distill=true", "distill_general=3", "gate_ramp=0.5", f"output_dir={tmp_path / 'kl'}"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "gates: distilling the ungated model during gate training (T=2, task loss weight 0, 3 news articles)"
        in printed
    )
    # the news articles taught by a model of their own, in the gate phase and in the recovery
    # (and the hidden states distilled beside the logits, in both)
    news = ["gate_distill=true", "distill_general=3", "distill_general_teacher=tiny-llama", "recover=distill",
            "recover_steps=2", "distill_hidden=0.5", "distill_answer=1", "recover_lr_scheduler=constant_with_warmup",
            "recover_warmup_steps=2", "lr=1e-3", "recover_lr=4e-4", f"output_dir={tmp_path / 'news'}"]  # fmt: skip
    assert main([*run, *news]) == 0
    printed = capsys.readouterr().out
    # the recovery's own schedule: warmed up over its 2 steps, while the gate phase keeps the run's constant lr
    assert [r["lr"] for r in _log(tmp_path / "news" / "recover")] == ["0.0", "0.0002"]
    assert {r["lr"] for r in _log(tmp_path / "news")} == {"0.001"}
    said = ", taught by tiny-llama; hidden states weight 0.5; answers weight 1)"
    assert "task loss weight 0, 3 news articles" + said in printed
    assert "recover: distilling tiny-llama into the pruned model for 2 steps" in printed
    assert said in printed.split("recover: distilling", 1)[1]
    # with the weights training, the ungated model would move with them: the teacher is a frozen copy
    assert main([*run, "gate_distill=true", "gate_train_weights=true", f"output_dir={tmp_path / 'w'}"]) == 0
    assert "gates: distilling tiny-llama during gate training" in capsys.readouterr().out
    ce = json.loads((tmp_path / "ce" / "metrics.json").read_text())
    kl = json.loads((tmp_path / "kl" / "metrics.json").read_text())
    w = json.loads((tmp_path / "w" / "metrics.json").read_text())
    assert w["first_loss"] < 0.05 and w["trainable_params"] > 100 * kl["trainable_params"], (w, kl)
    # the first step: the task loss of a random model is about ln(vocab); the KL of a model whose gates are
    # all open (only the training noise differs) to the ungated model is close to 0
    assert ce["first_loss"] > 4.0 and kl["first_loss"] < 0.05, (ce["first_loss"], kl["first_loss"])
    # the loss counts every attended next token (the news articles' too), not only the labelled ones
    import csv

    def tokens(run):
        with open(tmp_path / run / "train_log.csv") as f:
            return [int(r["tokens"]) for r in csv.DictReader(f)]

    assert all(k > 5 * c for k, c in zip(tokens("kl"), tokens("ce"), strict=True)), (
        tokens("kl"),
        tokens("ce"),
    )


def _log(run):
    import csv

    with open(run / "train_log.csv") as f:
        return list(csv.DictReader(f))


def test_distill_options_need_a_distillation(tmp_path, capsys):
    from neurontune.cli import main

    run = ["finetune", "model=tiny-llama", "method=gates", f"output_dir={tmp_path / 'x'}"]
    assert main([*run, "distill_general=4"]) == 2
    assert "distill_general is for recover=distill or gate_distill=true; add it or drop distill_general" in (
        capsys.readouterr().err
    )
    assert main([*run, "gate_distill=true", "distill_temperature=0"]) == 2
    assert "distillation needs distill_temperature > 0" in capsys.readouterr().err
    assert main([*run, "gate_ramp=1.0"]) == 2
    assert "gate_ramp must be in [0, 1)" in capsys.readouterr().err
    assert main([*run, "gate_distill=true", "distill_general_teacher=tiny-llama"]) == 2
    assert "distill_general_teacher teaches the distill_general news articles" in capsys.readouterr().err
    assert main([*run, "distill_general=2", "distill_general_teacher=tiny-llama"]) == 2
    assert "distill_general_teacher is for recover=distill or gate_distill=true" in capsys.readouterr().err
    assert main([*run, "distill_hidden=1"]) == 2
    assert "distill_hidden is for recover=distill or gate_distill=true" in capsys.readouterr().err
    assert main([*run, "recover=distill", "distill_hidden=-1"]) == 2
    assert "distill_hidden >= 0" in capsys.readouterr().err
    assert main([*run, "distill_answer=1"]) == 2
    assert "distill_answer is for recover=distill or gate_distill=true" in capsys.readouterr().err
    assert main([*run, "gate_distill=true", "distill_answer=-1"]) == 2
    assert "distill_answer >= 0" in capsys.readouterr().err
    # transformers' constant schedule would ignore a warm-up: refused, for the run and for the recovery
    assert main([*run, "recover_warmup_steps=3"]) == 2
    assert "recover_warmup_steps is for recover=distill" in capsys.readouterr().err
    assert main([*run, "recover=distill", "recover_warmup_steps=3"]) == 2
    assert "recover_warmup_steps=3 does nothing with lr_scheduler=constant" in capsys.readouterr().err
    assert (
        main(
            [
                *run,
                "recover=distill",
                "lr_scheduler=cosine",
                "warmup_steps=2",
                "recover_lr_scheduler=constant",
            ]
        )
        == 2
    )
    assert "warmup_steps=2 does nothing with recover_lr_scheduler=constant" in capsys.readouterr().err
    assert main([*run, "warmup_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "warmup_steps=2 does nothing with lr_scheduler=constant" in err and "constant_with_warmup" in err
    # the gates' own constant rate: nothing to keep them out of under a constant schedule
    assert main([*run, "gate_lr_scheduler=constant"]) == 2
    assert "gate_lr_scheduler=constant does nothing with lr_scheduler=constant" in capsys.readouterr().err
    assert main([*run, "gate_lr_scheduler=cosine"]) == 2
    assert "gate_lr_scheduler='cosine' is not one of" in capsys.readouterr().err


def test_distill_loss_weighs_a_per_token_kl_against_a_per_token_task_loss(tokenizer):
    """alpha=1 is the task's cross-entropy per labelled token averaged per example, alpha=0 the KL per
    attended position, whatever the ratio of the two counts (one labelled token per example against a
    whole prompt)."""
    from neurontune.distill import attended_tokens, distill_loss
    from neurontune.train import labelled_tokens, token_loss

    student, teacher = tiny_model("tiny-llama"), tiny_model("tiny-llama")
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3.0)
    batch = StepBatches(
        [Example(f"a long prompt number {i} " * 3, " x") for i in range(4)], tokenizer, 4, 64, 0
    )[0]
    n = attended_tokens(batch)
    assert n > 10 * labelled_tokens(batch)
    with torch.no_grad():
        task = token_loss(student, batch, labelled_tokens(batch))
        assert torch.allclose(distill_loss(teacher, alpha=1.0)(student, batch, n), task)
        kl, half = (
            distill_loss(teacher, alpha=0.0)(student, batch, n),
            distill_loss(teacher, alpha=0.5)(student, batch, n),
        )
        assert kl > 0 and torch.allclose(half, 0.5 * kl + 0.5 * task)
        # two micro-batches of one step: each weighed by its share of the positions
        a, b = ({k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()})
        split = sum(distill_loss(teacher, alpha=1.0)(student, m, n) for m in (a, b))
        wa = attended_tokens(a) / n
        assert torch.allclose(
            split,
            wa * token_loss(student, a, labelled_tokens(a))
            + (1 - wa) * token_loss(student, b, labelled_tokens(b)),
        )
        # an article mixed in (every token labelled) weighs as one example, not as its many tokens
        mixed = StepBatches(
            [Example("a long prompt " * 3, " x"), Example("", " an article " * 8)], tokenizer, 2, 64, 0
        )[0]
        one = [{k: v[i : i + 1] for k, v in mixed.items()} for i in range(2)]
        assert labelled_tokens(one[1]) > 10 * labelled_tokens(one[0])
        per_example = [token_loss(student, m, labelled_tokens(m)) for m in one]
        got = distill_loss(teacher, alpha=1.0)(student, mixed, attended_tokens(mixed))
        assert torch.allclose(got, (per_example[0] + per_example[1]) / 2)


def test_the_answer_term_weighs_the_kl_at_the_task_answers_per_example(tokenizer):
    """distill_loss(answer=w): w x the mean over the task's examples of each one's KL per answer token
    (T^2-scaled, like the per-token KL), weighed like the task loss; the news windows' tokens, all
    labelled, do not count as answers, and with ``alpha`` and ``hidden`` the terms add."""
    from neurontune.distill import _kl, attended_tokens, distill_loss
    from neurontune.tasks import IGNORE_INDEX, text_windows

    student, teacher = tiny_model("tiny-llama"), tiny_model("tiny-llama")
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3.0)
    task = [Example(f"a prompt number {i} " * (i + 1), " x y" if i % 2 else " x") for i in range(3)]
    news = text_windows(["an article about the weather " * 6], tokenizer, 16)
    batch = StepBatches(task + news, tokenizer, len(task) + len(news), 32, 0)[0]
    n = attended_tokens(batch)
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
            :, :-1
        ]
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
            :, :-1
        ]
        kl = _kl(s_logits, t_logits, 2.0)
        labels = batch["labels"][:, 1:]
        by_hand, counts, rows = [], [], []
        for row in range(len(labels)):
            if batch["general"][row]:
                continue
            at = labels[row] != IGNORE_INDEX
            counts.append(int(at.sum()))
            by_hand.append(kl[row][at].mean())
            rows.append(row)
        assert len(by_hand) == len(task) and len(set(counts)) > 1, counts  # answers of different lengths
        expected = torch.stack(by_hand).mean()
        base = distill_loss(teacher)(student, batch, n)
        got = distill_loss(teacher, answer=2.0)(student, batch, n)
        assert torch.allclose(got - base, 2.0 * expected, atol=1e-6), (got - base, expected)
        # beside the task loss and the hidden states: the terms add
        both = distill_loss(teacher, alpha=0.5, hidden=0.3, answer=2.0)(student, batch, n)
        assert torch.allclose(both - distill_loss(teacher, alpha=0.5, hidden=0.3)(student, batch, n), 2.0 * expected,
                              atol=1e-6)  # fmt: skip
        # a micro-batch holding part of the step's positions weighs its answers by that share
        half = {k: v[rows[:2]] for k, v in batch.items()}
        share = attended_tokens(half) / n
        gain = distill_loss(teacher, answer=1.0)(student, half, n) - distill_loss(teacher)(student, half, n)
        assert share < 1 and torch.allclose(gain, share * torch.stack(by_hand[:2]).mean(), atol=1e-6)
        # news alone: no answers, nothing added
        only_news = {k: v[batch["general"]] for k, v in batch.items()}
        m = attended_tokens(only_news)
        assert torch.equal(distill_loss(teacher, answer=5.0)(student, only_news, m),
                           distill_loss(teacher)(student, only_news, m))  # fmt: skip


def test_the_news_rows_may_have_a_teacher_of_their_own(tokenizer):
    """distill_loss(general_teacher=...): the batch's general rows (news windows) are distilled from the
    general teacher, the task's rows from the teacher; each teacher sees only its own rows, and a batch
    without news never calls the general teacher."""
    from neurontune.distill import attended_tokens, distill_loss
    from neurontune.tasks import text_windows

    student, teacher, general = (tiny_model("tiny-llama") for _ in range(3))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3.0)
        general.lm_head.weight.mul_(-2.0)
    seen = {"teacher": [], "general": []}

    def recorded(model, name):
        def forward(**inputs):
            seen[name].append(inputs["input_ids"].clone())
            return model(**inputs)

        return forward

    task = [Example(f"a prompt number {i}", " x") for i in range(3)]
    news = text_windows(["an article about the weather " * 6], tokenizer, 16)
    assert len(news) > 1 and all(e.general for e in news)
    data = StepBatches(task + news, tokenizer, len(task) + len(news), 16, 0)
    batch = data[0]
    rows = batch["general"]
    assert rows.dtype == torch.bool and int(rows.sum()) == len(news)  # one flag per example, in batch order
    n = attended_tokens(batch)
    with torch.no_grad():
        both = distill_loss(recorded(teacher, "teacher"), general_teacher=recorded(general, "general"))(
            student, batch, n
        )
        assert [len(x) for x in seen["teacher"]] == [len(task)] and [len(x) for x in seen["general"]] == [
            len(news)
        ]
        assert torch.equal(seen["general"][0], batch["input_ids"][rows])
        # the sum over rows of each row's KL to its own teacher (alpha=0: a sum over positions, divided by n)
        part = {k: {key: v[sel] for key, v in batch.items()} for k, sel in (("task", ~rows), ("news", rows))}
        expected = distill_loss(teacher)(student, part["task"], n) + distill_loss(general)(
            student, part["news"], n
        )
        assert torch.allclose(both, expected)
        assert not torch.allclose(both, distill_loss(teacher)(student, batch, n))
        # the same teacher for both: the loss of one teacher
        same = distill_loss(teacher, general_teacher=teacher)(student, batch, n)
        assert torch.allclose(same, distill_loss(teacher)(student, batch, n), atol=1e-6)
        # no news in the data: no ``general`` in the batches, the general teacher is never called
        plain = StepBatches(task, tokenizer, len(task), 16, 0)[0]
        assert "general" not in plain
        seen["general"].clear()
        distill_loss(teacher, general_teacher=recorded(general, "general"))(
            student, plain, attended_tokens(plain)
        )
        assert seen["general"] == []


def test_distill_hidden_adds_each_layers_cosine_distance_to_the_teachers_hidden_states(tokenizer):
    """distill_loss(hidden=w) adds w x (sum over the KL's positions of the mean over layers of
    1 - cos(h_s, h_t)) / n; the news rows compare with the news teacher's layers; a teacher whose
    layers do not pair with the student's is one clear error."""
    import copy

    from transformers import AutoModelForCausalLM

    from neurontune.distill import attended_tokens, distill_loss, next_token_positions
    from neurontune.errors import NeurontuneError
    from neurontune.tasks import text_windows

    student, teacher, general = (tiny_model("tiny-llama", seed=s) for s in (0, 1, 2))
    task = [Example(f"a prompt number {i}", " x") for i in range(3)]
    news = text_windows(["an article about the weather " * 6], tokenizer, 16)
    batch = StepBatches(task + news, tokenizer, len(task) + len(news), 16, 0)[0]
    rows, n = batch["general"], attended_tokens(batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def states(model, sel):
        out = model(**{k: v[sel] for k, v in inputs.items()}, output_hidden_states=True)
        assert (
            len(out.hidden_states) == student.config.num_hidden_layers + 1
        )  # the embeddings, then a layer each
        return out.hidden_states[1:]

    with torch.no_grad():
        logits_only = distill_loss(teacher, general_teacher=general)(student, batch, n)
        assert torch.allclose(
            distill_loss(teacher, general_teacher=general, hidden=0.0)(student, batch, n), logits_only
        )
        both = distill_loss(teacher, general_teacher=general, hidden=3.0)(student, batch, n)
        expected = 0.0
        for sel, who in ((~rows, teacher), (rows, general)):
            mask = next_token_positions({k: v[sel] for k, v in batch.items()})
            for hs, ht in zip(states(student, sel), states(who, sel), strict=True):
                cos = (hs * ht).sum(-1) / (hs.norm(dim=-1) * ht.norm(dim=-1))
                expected += ((1 - cos[:, :-1]) * mask).sum() / student.config.num_hidden_layers
        assert expected > 0
        assert torch.allclose(both - logits_only, 3.0 * expected / n, rtol=1e-4)
        # a student that is its teacher's copy: neither term
        assert float(distill_loss(student, hidden=3.0)(copy.deepcopy(student), batch, n)) < 1e-6
    # the term reaches every layer's weights, the first layer's too, with no KL at all (temperature aside)
    student.zero_grad()
    only_hidden = distill_loss(teacher, hidden=1.0)
    (only_hidden(student, batch, n) - distill_loss(teacher)(student, batch, n)).backward()
    assert student.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    deeper = copy.deepcopy(student.config)
    deeper.num_hidden_layers = 3
    with pytest.raises(
        NeurontuneError, match="distill_hidden pairs the layers one to one: the student returns 2"
    ):
        distill_loss(AutoModelForCausalLM.from_config(deeper), hidden=1.0)(student, batch, n)


def test_the_mean_penalty_aims_at_the_share_the_export_removes():
    """gate_sparsity counts parameters; FineGates' mean penalty still asks each group for the share of
    gates the export plan shuts (29 of 64 channels at 30 % on the tiny model), not 30 % of them."""
    gated = GatedModel(tiny_model("tiny-llama"), GateConfig(target_sparsity=0.3, penalty="mean", lam=1.0))
    target = 1 - 29 / 64
    with torch.no_grad():
        for g in gated.groups.values():  # every gate open with probability 1 - 29/64: the penalty is 0
            lo, hi = -3.0, 3.0
            for _ in range(60):  # bisect a (open_prob grows with it)
                g.a.fill_((lo + hi) / 2)
                lo, hi = ((lo + hi) / 2, hi) if g.open_prob().mean().item() < target else (lo, (lo + hi) / 2)
            assert abs(g.open_prob().mean().item() - target) < 1e-4
        assert gated.regularization().item() < 1e-3


def test_with_ema_decay_the_export_is_made_from_the_moving_average_of_the_gates(tmp_path):
    """ema_decay: the gates and low-rank terms the export is made from (gates.safetensors) are the moving
    average the last checkpoint holds, not the last step's parameters."""
    from safetensors.torch import load_file

    from neurontune.cli import main

    out = tmp_path / "run"
    rc = main(["finetune", "model=tiny-llama", "method=gates", "gate_sparsity=0.5", "steps=12", "gate_ramp=0.25",
               "gate_lr=0.5", "gate_low_rank=4", "lr=1e-2", "train_examples=40", "eval_examples=4",
               "forgetting_examples=0", "eval_before=false", "ema_decay=0.8", "gate_force=true",
               f"output_dir={out}"])  # fmt: skip
    assert rc == 0
    gates = load_file(out / "gates.safetensors")
    last = load_file(out / "checkpoints" / "step-000012" / "state.safetensors")
    assert all(torch.equal(last[f"ema.{k}"], v) for k, v in gates.items())
    assert any(not torch.equal(last[f"param.{k}"], v) for k, v in gates.items())
    m = json.loads((out / "metrics.json").read_text())
    g = m["gates"]
    # the average reached the target too: the export cuts nothing open, so it is the averaged gated model
    assert g["shape"]["forced_fraction"] == 0.0 and g["exported"]["accuracy"] == g["gated"]["accuracy"]

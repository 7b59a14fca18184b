"""Scorers on hand-checkable cases.

The toy model has one target linear ``lin`` (3 -> 4) over a frozen embedding; its loss is
``sum_t <c, lin(x_t)>`` over unmasked tokens, so dL/dW = c ⊗ sum_t x_t exactly.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from neurontune import NeurontuneError
from neurontune.scoring import LayerStats, get_scorer, score_model, scorer
from neurontune.selection import select

C = torch.tensor([1.0, -2.0, 0.5, 3.0])


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(10, 3)
        self.emb.weight.data = torch.randn(10, 3, generator=g)
        self.lin = nn.Linear(3, 4, bias=False)
        self.lin.weight.data = torch.randn(4, 3, generator=g)

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = self.emb(input_ids)
        y = self.lin(x)
        m = attention_mask.unsqueeze(-1).float() if attention_mask is not None else 1.0
        return SimpleNamespace(loss=(y * C * m).sum(), logits=y)


def toy_batches():
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    b1 = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    ids2 = torch.tensor([[6, 7, 8, 9]])
    b2 = {"input_ids": ids2, "attention_mask": torch.ones_like(ids2), "labels": ids2}
    return [b1, b2]


def token_inputs(model, batches):
    """Unmasked input vectors x_t per batch (and per example)."""
    per_batch, per_example = [], []
    for b in batches:
        xs = []
        for i in range(b["input_ids"].shape[0]):
            keep = b["attention_mask"][i].bool()
            x = model.emb.weight[b["input_ids"][i][keep]].detach()
            per_example.append(x)
            xs.append(x)
        per_batch.append(torch.cat(xs))
    return per_batch, per_example


def test_taylor_matches_closed_form():
    m, batches = Toy(), toy_batches()
    per_batch, _ = token_inputs(m, batches)
    g = C[:, None] * torch.cat(per_batch).sum(0)[None, :]
    expected = (m.lin.weight.detach() * g).abs().sum(1)
    s = score_model(m, "taylor", batches=batches, target_modules=["lin"])["lin"]
    torch.testing.assert_close(s, expected)
    assert all(not p.requires_grad or p.grad is None for p in m.parameters())


@pytest.mark.parametrize("per_sample", [False, True])
def test_fisher_matches_closed_form(per_sample):
    m, batches = Toy(), toy_batches()
    per_batch, per_example = token_inputs(m, batches)
    groups = per_example if per_sample else per_batch
    g_sq = torch.stack([(C[:, None] * x.sum(0)[None, :]) ** 2 for x in groups]).mean(0)
    expected = (m.lin.weight.detach() ** 2 * g_sq).sum(1)
    s = score_model(m, "fisher", batches=batches, target_modules=["lin"], per_sample=per_sample)["lin"]
    torch.testing.assert_close(s, expected)


def test_wanda_ignores_padding():
    m, batches = Toy(), toy_batches()
    per_batch, _ = token_inputs(m, batches)
    norm = torch.cat(per_batch).pow(2).sum(0).sqrt()
    expected = (m.lin.weight.detach().abs() * norm[None, :]).sum(1)
    torch.testing.assert_close(
        score_model(m, "wanda", batches=batches, target_modules=["lin"])["lin"], expected
    )


def test_activation_frequency_and_strength():
    m, batches = Toy(), toy_batches()
    x = torch.cat(token_inputs(m, batches)[0])
    y = x @ m.lin.weight.detach().t()
    freq = score_model(m, "activation", batches=batches, target_modules=["lin"], mode="frequency")["lin"]
    torch.testing.assert_close(freq, (y > 0).float().mean(0))
    strength = score_model(m, "activation", batches=batches, target_modules=["lin"])["lin"]
    torch.testing.assert_close(strength, y.abs().mean(0))


def test_zo_taylor_estimates_the_gradient_and_restores_weights():
    m, batches = Toy(), toy_batches()
    w0 = m.lin.weight.detach().clone()
    g = C[:, None] * torch.cat(token_inputs(m, batches)[0]).sum(0)[None, :]
    s = score_model(m, "zo-taylor", batches=batches, target_modules=["lin"], samples=400, eps=1e-2)["lin"]
    exact = (w0 * g).abs().sum(1)
    assert torch.corrcoef(torch.stack([s, exact]))[0, 1] > 0.95
    assert s.argmax() == exact.argmax()
    torch.testing.assert_close(m.lin.weight.detach(), w0, rtol=0, atol=1e-5)


def test_magnitude_ranks_scaled_row_first(fresh_model):
    m = fresh_model("tiny-llama")
    name = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        m.get_submodule(name).weight[37] *= 10
    spec = select(m, score_model(m, "magnitude"), rows_per_module=1)
    assert spec.modules[name].rows == [37]
    p2 = score_model(m, "magnitude", p=2)[name]
    torch.testing.assert_close(p2, m.get_submodule(name).weight.detach().pow(2).sum(1))


def test_neft_scorer_ranks_most_changed_row_first():
    w = torch.randn(5, 8)
    after = w.clone()
    after[3] = -after[3] + 0.1  # nearly reversed: cosine ~ -1
    after[1] += 0.01 * torch.randn(8)  # barely moved
    s = get_scorer("neft")(w, LayerStats("x", weight_after=after))
    assert s.argmax() == 3 and s[3] > 1.5
    assert s[0] == pytest.approx(0.0, abs=1e-6) and s[1] < 1e-2


def test_neft_probe_equals_manual_probe_and_restores_model(fresh_model, tokenizer):
    from neurontune.tasks import Example, fixed_batches

    m = fresh_model("tiny-llama")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ex = [Example(f"review {i} was", " positive" if i % 2 else " negative") for i in range(8)]
    calib = fixed_batches(ex, tokenizer, 4, 32)
    scores = score_model(m, "neft", batches=calib, probe_steps=3, probe_lr=1e-2)
    for n, p in m.named_parameters():  # restored bit for bit, grads cleared
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)
        assert p.grad is None
    # manual probe: AdamW on the target linears for 3 steps, then 1 - cos per row
    ref = fresh_model("tiny-llama")
    names = list(scores)
    ref.requires_grad_(False)
    ws = [ref.get_submodule(n).weight for n in names]
    for w in ws:
        w.requires_grad_(True)
    opt = torch.optim.AdamW(ws, lr=1e-2, weight_decay=0.0)
    ref.train()
    for step in range(3):
        ref(**calib[step % len(calib)]).loss.backward()
        opt.step()
        opt.zero_grad()
    for n in names:
        cos = torch.nn.functional.cosine_similarity(
            before[f"{n}.weight"], ref.get_submodule(n).weight.detach(), dim=1
        )
        torch.testing.assert_close(scores[n], 1 - cos, rtol=1e-4, atol=1e-6)


def test_data_scorers_restore_grad_flags(fresh_model, tokenizer):
    from neurontune.tasks import Example, fixed_batches

    m = fresh_model("tiny-gpt2")
    m.transformer.wte.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    calib = fixed_batches([Example("a b c", " d")] * 4, tokenizer, 2, 16)
    for name in ("taylor", "fisher", "wanda", "activation", "zo-taylor", "neft", "random", "magnitude"):
        scores = score_model(m, name, batches=calib)
        assert len(scores) == 2 * 4  # c_attn, c_proj (attn), c_fc, c_proj (mlp) per layer
        assert all(torch.isfinite(s).all() for s in scores.values())
        assert {n: p.requires_grad for n, p in m.named_parameters()} == flags


def test_custom_scorer_with_needs():
    m, batches = Toy(), toy_batches()

    @scorer(needs=("grad",))
    def grad_norm(weight, stats):
        return stats.grad.norm(dim=1)

    s = score_model(m, grad_norm, batches=batches, target_modules=["lin"])["lin"]
    g = C[:, None] * torch.cat(token_inputs(m, batches)[0]).sum(0)[None, :]
    torch.testing.assert_close(s, g.norm(dim=1))
    # a plain function (no decorator) is a data-free scorer
    s2 = score_model(m, lambda w, st: w.sum(1), target_modules=["lin"])["lin"]
    torch.testing.assert_close(s2, m.lin.weight.detach().sum(1))


def test_scorer_errors(fresh_model):
    m, batches = Toy(), toy_batches()
    with pytest.raises(NeurontuneError, match="unknown scorer 'tayler'"):
        score_model(m, "tayler", batches=batches, target_modules=["lin"])
    with pytest.raises(NeurontuneError, match="needs calibration data"):
        score_model(m, "taylor", target_modules=["lin"])
    with pytest.raises(NeurontuneError, match="calibration data is empty"):
        score_model(m, "wanda", batches=[], target_modules=["lin"])
    unlabelled = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in batches]
    with pytest.raises(NeurontuneError, match="calibration data is empty"):
        score_model(m, "taylor", batches=unlabelled, target_modules=["lin"])
    with pytest.raises(NeurontuneError, match=r"expected a tensor of shape \(4,\)"):
        score_model(m, lambda w, st: w.sum(), target_modules=["lin"])
    with pytest.raises(NeurontuneError, match="unknown scorer needs"):
        scorer(needs=("hessian",))
    with pytest.raises(NeurontuneError, match="bad options"):
        score_model(m, "magnitude", target_modules=["lin"], q=3)


def test_random_scorer_differs_between_modules_of_one_shape():
    from neurontune.models import tiny_model
    from neurontune.scoring import score_model
    from neurontune.selection import select

    model = tiny_model("tiny-llama")
    spec = select(model, score_model(model, "random", seed=0), rows_per_module=4)
    same_shape = [n for n in spec.modules if n.endswith(("q_proj", "o_proj"))]  # all 32 x 32
    picks = {tuple(spec.modules[n].rows) for n in same_shape}
    assert len(same_shape) == 4 and len(picks) == 4, picks
    again = select(model, score_model(model, "random", seed=0), rows_per_module=4)
    assert again.to_dict()["modules"] == spec.to_dict()["modules"]  # still seeded
    other = select(model, score_model(model, "random", seed=1), rows_per_module=4)
    assert other.to_dict()["modules"] != spec.to_dict()["modules"]

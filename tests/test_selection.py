"""Budgets and overlap utilities."""

import pytest
import torch

from neurontune import NeuronSpec, NeurontuneError
from neurontune.scoring import score_model
from neurontune.selection import lora_params, overlap, rows_for_lora_rank, select


def test_lora_rank_budget_matches_within_one_row_per_module(fresh_model, model_kind):
    m = fresh_model(model_kind)
    spec = select(m, score_model(m, "random", seed=1), match_lora_rank=4)
    lora = spec.provenance["lora_params"]
    assert lora == sum(lora_params(s.shape, 4) for s in spec.modules.values())
    for sel in spec.modules.values():
        k = len(sel.rows)
        assert k == rows_for_lora_rank(sel.shape, 4)
        assert abs(k * sel.shape[1] - lora_params(sel.shape, 4)) <= sel.shape[1] / 2  # within half a row
    assert abs(spec.num_params() - lora) <= sum(s.shape[1] for s in spec.modules.values())


def test_lora_rank_budget_exact_when_divisible(fresh_model):
    m = fresh_model("tiny-llama")  # q/o 32x32, k/v 16x32, gate/up 64x32, down 32x64
    spec = select(m, score_model(m, "magnitude"), match_lora_rank=4)
    # q,o: 4*64/32=8 rows exact; k,v: 4*48/32=6 exact; gate,up: 4*96/32=12 exact; down: 4*96/64=6 exact
    assert (
        spec.num_params()
        == spec.provenance["lora_params"]
        == 2 * (2 * 4 * 64 + 2 * 4 * 48 + 2 * 4 * 96 + 4 * 96)
    )


def test_global_lora_budget_fits_the_count_and_follows_the_scores(fresh_model):
    m = fresh_model("tiny-llama")  # every module takes 32 or 64 params per row
    scores = score_model(m, "random", seed=0)
    hot = "model.layers.1.self_attn.q_proj"
    scores[hot][:4] = 1000 * scores[hot].mean()  # 4 rows far above every other after normalising by the mean
    spec = select(m, scores, global_lora_rank=4)
    lora = spec.provenance["lora_params"]
    assert lora == sum(
        lora_params(sh.shape, 4) for sh in select(m, scores, match_lora_rank=4).modules.values()
    )
    assert lora - 64 < spec.num_params() <= lora  # filled to within one row
    assert set(spec.modules[hot].rows) >= {0, 1, 2, 3}
    per_module = {
        n: rows_for_lora_rank(sh, 4) for n, sh in ((n, sel.shape) for n, sel in spec.modules.items())
    }
    assert any(len(sel.rows) != per_module[n] for n, sel in spec.modules.items())  # spread by score
    assert spec.provenance["budget"]["global_lora_rank"] == 4
    # each module's rows are its best, as with any budget
    for name, sel in spec.modules.items():
        best = torch.sort(scores[name], descending=True).indices[: len(sel.rows)]
        assert sel.rows == sorted(best.tolist())
    floor = select(m, scores, global_lora_rank=4, min_per_module=1)
    assert len(floor.modules) == len(scores) and floor.num_params() <= lora


def test_global_ratio_selects_right_count(fresh_model):
    m = fresh_model("tiny-llama")
    scores = score_model(m, "magnitude")
    total = sum(len(s) for s in scores.values())
    spec = select(m, scores, ratio=0.1)
    assert spec.num_rows() == round(0.1 * total)
    per = select(m, scores, ratio=0.25, per_layer=True)
    assert all(len(s.rows) == round(0.25 * s.shape[0]) for s in per.modules.values())
    guaranteed = select(m, scores, ratio=0.1, min_per_module=2)
    assert len(guaranteed.modules) == len(scores)
    assert all(len(s.rows) >= 2 for s in guaranteed.modules.values())
    assert guaranteed.num_rows() == round(0.1 * total)


def test_global_ratio_normalises_per_module(fresh_model):
    """A module whose scores are 1000x larger must not take the whole global budget."""
    m = fresh_model("tiny-llama")
    scores = score_model(m, "random", seed=0)
    scores["model.layers.0.mlp.up_proj"] *= 1000
    spec = select(m, scores, ratio=0.1)
    assert len(spec.modules["model.layers.0.mlp.up_proj"].rows) < 64 * 0.5
    assert len(spec.modules) > 5


def test_highest_lowest_and_ties(fresh_model):
    m = fresh_model("tiny-llama")
    name = "model.layers.0.mlp.up_proj"
    s = {name: torch.arange(64.0)}
    assert select(m, s, rows_per_module=3).modules[name].rows == [61, 62, 63]
    assert select(m, s, rows_per_module=3, order="lowest").modules[name].rows == [0, 1, 2]
    ties = {name: torch.zeros(64)}
    a = select(m, ties, rows_per_module=5, seed=1).modules[name].rows
    assert a == select(m, ties, rows_per_module=5, seed=1).modules[name].rows  # deterministic
    assert a != select(m, ties, rows_per_module=5, seed=2).modules[name].rows  # seed decides ties
    assert a != [0, 1, 2, 3, 4]  # not biased towards low indices


def test_budget_errors(fresh_model):
    m = fresh_model("tiny-llama")
    scores = score_model(m, "magnitude")
    with pytest.raises(NeurontuneError, match="exactly one budget"):
        select(m, scores)
    with pytest.raises(NeurontuneError, match="exactly one budget"):
        select(m, scores, ratio=0.1, rows_per_module=2)
    with pytest.raises(NeurontuneError, match="does not fit .*k_proj with 16 rows"):
        select(m, scores, rows_per_module=17)
    with pytest.raises(NeurontuneError, match=r"ratio must be in \(0, 1\]"):
        select(m, scores, ratio=1.5)
    with pytest.raises(NeurontuneError, match="min_per_module=20 does not fit"):
        select(m, scores, ratio=0.1, min_per_module=20)
    # a floor that alone breaks a global budget is refused, not met by a spec over the budget
    with pytest.raises(NeurontuneError, match=r"min_per_module=8 alone takes [\d,]+ rows, over the budget's"):
        select(m, scores, ratio=0.1, min_per_module=8)
    with pytest.raises(NeurontuneError, match=r"min_per_module=16 alone takes [\d,]+ parameters, over"):
        select(m, scores, global_lora_rank=1, min_per_module=16)
    with pytest.raises(NeurontuneError, match="no scores"):
        select(m, {}, ratio=0.1)


def test_overlap_hand_checked():
    a = NeuronSpec({"m.layers.0.q": {"rows": [0, 1, 2, 3], "shape": [8, 4]}, "m.layers.1.q": [5]})
    b = NeuronSpec({"m.layers.0.q": {"rows": [2, 3, 4], "shape": [8, 4]}, "m.layers.2.q": [5]})
    o = overlap(a, b)
    assert o["per_module"]["m.layers.0.q"]["jaccard"] == pytest.approx(2 / 5)
    assert o["per_module"]["m.layers.0.q"]["overlap"] == pytest.approx(2 / 3)
    assert o["per_module"]["m.layers.1.q"]["jaccard"] == 0.0
    assert o["intersection"] == 2 and o["size_a"] == 5 and o["size_b"] == 4
    assert o["jaccard"] == pytest.approx(2 / 7)
    assert set(o["per_layer"]) == {"0", "1", "2"}
    assert overlap(a, a)["jaccard"] == 1.0

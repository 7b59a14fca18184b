"""Metrics on hand-checkable cases."""

import functools
import math

import pytest
import torch

from neurontune.evaluation import classification_accuracy, generation_metrics, number_exact_match, perplexity
from neurontune.models import tiny_model
from neurontune.tasks import Example


def test_generation_metrics_extremes():
    refs = ["the cat sat on the mat", "a dog ran far away today"]
    perfect = generation_metrics(refs, refs)
    assert perfect == {
        "bleu": pytest.approx(100),
        "chrf": pytest.approx(100),
        "rougeL": 100,
        "exact_match": 100,
    }
    off = generation_metrics(["zzz qqq", "xxx yyy"], refs)
    assert off["bleu"] == 0 and off["rougeL"] == 0 and off["exact_match"] == 0
    half = generation_metrics(["the cat sat", refs[1]], refs)
    assert half["exact_match"] == 50 and 50 < half["rougeL"] < 100  # ROUGE-L F1 of 3/6 words: 2/3


def test_number_exact_match_takes_the_first_integer():
    assert (
        number_exact_match([" 109\nQ: next", "-4 apples", "about 7", "none"], ["109", "-4", "8", "1"]) == 50
    )


def test_perplexity_of_a_uniform_model_is_the_vocab_size(tokenizer):
    model = tiny_model("tiny-llama")
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: uniform over the vocabulary
    ppl = perplexity(model, tokenizer, [Example("", "hello world"), Example("ab", "cd")])
    assert ppl == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_classification_uses_whole_words_when_first_tokens_clash(tokenizer):
    # byte-level: " negative" and " positive" both start with " ", so whole-word likelihoods decide
    model = tiny_model("tiny-llama")
    exs = [Example(f"Review {i}\nSentiment:", "", i % 2) for i in range(6)]
    acc = classification_accuracy(model, tokenizer, exs, ("negative", "positive"), batch_size=4)
    expected = 0
    for e in exs:
        scores = []
        for w in ("negative", "positive"):
            p = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
            c = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)
            scores.append(sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(c)))
        expected += int(scores.index(max(scores)) == e.label)
    assert acc == pytest.approx(expected / len(exs))
    assert math.isfinite(acc)


def spy_on_forward(model, monkeypatch) -> list[tuple]:
    """Each forward of ``model`` from now on, as (its logits_to_keep, input length, logits length)."""
    calls = []
    real = type(model).forward

    @functools.wraps(real)  # keeps the signature keeps_logits reads
    def forward(self, *args, **kw):
        out = real(self, *args, **kw)
        calls.append((kw.get("logits_to_keep"), kw["input_ids"].shape[1], out.logits.shape[1]))
        return out

    monkeypatch.setattr(type(model), "forward", forward)
    return calls


def test_classification_runs_the_head_on_each_prompts_last_token_only(tokenizer, monkeypatch):
    """With label words of distinct first tokens, one forward scores a batch of prompts of different
    lengths; the head runs on their last positions only (logits_to_keep) and predicts as on all."""
    import neurontune.evaluation as ev
    from neurontune.evaluation import classification_predictions, keeps_logits

    model = tiny_model("tiny-llama", seed=1)
    assert keeps_logits(model)
    exs = [Example("Review " + "ab" * (i % 7) + f" {i}:", "", 0) for i in range(40)]
    with torch.no_grad():  # labels: the tokens the model likes best after some prompts, so predictions vary
        top = [int(model(input_ids=torch.tensor([tokenizer(e.prompt)["input_ids"]])).logits[0, -1].argmax())
               for e in exs]  # fmt: skip
    labels = sorted(set(top))[:4]
    assert len(labels) > 1
    monkeypatch.setattr(ev, "label_token_ids", lambda tok, words: labels)  # distinct first tokens
    words = [str(t) for t in labels]
    calls = spy_on_forward(model, monkeypatch)
    preds = classification_predictions(model, tokenizer, exs, words, batch_size=8)
    # logits for at most one position per prompt of the batch (8), not for every token (10 to 26)
    assert all(isinstance(k, torch.Tensor) for k, _, _ in calls) and max(n for _, _, n in calls) <= 8
    monkeypatch.setattr(ev, "keeps_logits", lambda m: False)
    assert preds == classification_predictions(model, tokenizer, exs, words, batch_size=8)
    assert len(set(preds)) > 1


def test_multiple_choice_picks_the_choice_with_the_highest_summed_log_likelihood(tokenizer):
    """Each example's own choices, scored by the summed log-probability of their tokens (checked against a
    per-choice forward pass); choices of different token lengths and counts share a batch."""
    from neurontune.evaluation import _prompt_ids, choice_predictions, evaluate
    from neurontune.tasks import Task

    torch.manual_seed(0)
    model = tiny_model("tiny-llama").eval()
    examples = [
        Example("Q: pick one", " b", 1, ("a", "b")),
        Example("Which is right?", " long answer here", 2, ("x", "y z", "long answer here")),
        Example("Another", " n", 0, ("n", "m", "o", "pq rs")),
    ]

    def by_hand(e: Example) -> int:
        p = _prompt_ids(tokenizer, e.prompt, 256)
        scores = []
        for c in e.choices:
            w = tokenizer(" " + c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([p + w])).logits[0].float(), -1)
            scores.append(sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(w)))
        return max(range(len(scores)), key=scores.__getitem__)

    expected = [by_hand(e) for e in examples]
    assert choice_predictions(model, tokenizer, examples, batch_size=4) == expected
    task = Task("mc", "multiple_choice", examples, examples)
    out = evaluate(model, tokenizer, task)
    assert out["accuracy"] == pytest.approx(
        sum(p == e.label for p, e in zip(expected, examples, strict=True)) / 3
    )
    assert out["samples"][1]["reference"] == "long answer here"
    assert out["samples"][0]["prediction"] in ("a", "b")


def test_choice_scores_run_the_head_on_the_choice_positions_only(tokenizer, monkeypatch):
    """Scoring choices (and label words that share a first token) runs the head and the log-softmax on the
    positions that predict a choice token only (logits_to_keep), with the scores of the full logits."""
    import neurontune.evaluation as ev

    model = tiny_model("tiny-llama", seed=2).eval()
    prompts = [tokenizer("A rather long prompt " + "x y " * i)["input_ids"] for i in range(1, 6)]
    choices = [("yes", "no"), ("a b c", "d"), ("one", "two", "three"), ("p",), ("q r", "s")]
    calls = spy_on_forward(model, monkeypatch)
    scores = ev._choice_logprobs(model, tokenizer, prompts, choices)
    ((kept, length, positions),) = calls
    assert isinstance(kept, torch.Tensor) and positions < length / 2
    monkeypatch.setattr(ev, "keeps_logits", lambda m: False)
    full = ev._choice_logprobs(model, tokenizer, prompts, choices)
    assert calls[-1][2] == length
    for a, b in zip(scores, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_builtin_choice_tasks_and_the_validation_split():
    from neurontune.evaluation import primary_metric
    from neurontune.tasks import load_task

    for name in ("hyperbaton", "unit_identification", "sports_understanding", "vitaminc", "si_conversion"):
        task = load_task(name)
        assert task.kind == "multiple_choice" and primary_metric(task) == "accuracy"
        for e in task.train[:50] + task.eval[:50]:
            assert len(e.choices) >= 2 and e.completion == " " + e.choices[e.label]
    past = load_task("past_tense")
    assert primary_metric(past) == "exact_match" and past.train[0].prompt.startswith("Today I ")
    negation = load_task("negation")
    assert primary_metric(negation) == "exact_match" and " not " in negation.train[0].completion
    task = load_task("hyperbaton")
    val = task.validation(0.1)
    assert val.eval == task.train[-len(val.eval) :] and len(val.eval) == int(len(task.train) * 0.1)
    assert not {id(e) for e in val.train} & {id(e) for e in val.eval}  # training leaves the validation split
    assert not {id(e) for e in val.eval} & {id(e) for e in task.eval}  # and the test split is not read


def test_classification_reports_the_share_of_examples_given_each_label(tokenizer, monkeypatch, tmp_path):
    """``label_shares``: how the predictions split over the label words (a model drifting to one label
    shows it there); an evaluation curve keeps it beside the metrics."""
    import neurontune.evaluation as ev
    from neurontune.evaluation import EvalCurve, evaluate
    from neurontune.tasks import Task

    model = tiny_model("tiny-llama", seed=1)
    exs = [Example("Review " + "ab" * (i % 7) + f" {i}:", "", i % 2) for i in range(40)]
    with torch.no_grad():  # label words the model likes after some prompts, so the predictions vary
        top = [int(model(input_ids=torch.tensor([tokenizer(e.prompt)["input_ids"]])).logits[0, -1].argmax())
               for e in exs]  # fmt: skip
    labels = sorted(set(top))[:2]
    monkeypatch.setattr(ev, "label_token_ids", lambda tok, words: labels)
    words = (str(labels[0]), str(labels[1]))
    preds = ev.classification_predictions(model, tokenizer, exs, words)
    out = evaluate(model, tokenizer, Task("c", "classification", exs, exs, label_words=words))
    assert out["label_shares"] == {words[0]: preds.count(0) / 40, words[1]: preds.count(1) / 40}
    assert 0 < out["label_shares"][words[0]] < 1, out["label_shares"]
    curve = EvalCurve(tmp_path / "eval_log.json", "accuracy")
    assert "label_shares" not in curve.add(5, out)  # the numbers, for the trackers
    assert curve.points[5]["label_shares"] == out["label_shares"]

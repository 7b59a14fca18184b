"""Metrics on hand-checkable cases."""

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

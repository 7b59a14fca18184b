"""Prompts start with the tokenizer's BOS where it adds one (Llama-3, Mistral, Gemma), in training,
selection and every evaluation; tokenizers that add none (GPT-2, SmolLM2) are unchanged."""

import pytest
import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from neurontune.evaluation import (
    _prompt_ids,
    choice_predictions,
    classification_predictions,
    generate,
    perplexity,
)
from neurontune.models import tiny_model, tiny_tokenizer
from neurontune.tasks import IGNORE_INDEX, Example, StepBatches, encode, fit_max_length, special_prefix


def bos_tokenizer(template: str = "<eos> $A") -> PreTrainedTokenizerFast:
    """The tiny byte-level tokenizer with a Llama-3-style post-processor that puts its BOS (here the
    ``<eos>`` id, which it declares as ``bos_token``) before every text."""
    tok = tiny_tokenizer()
    backend = tok.backend_tokenizer
    specials = [(t, tok.convert_tokens_to_ids(t)) for t in ("<eos>", "<unk>") if t in template]
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<eos>"
    )


@pytest.fixture
def bos_tok():
    return bos_tokenizer()


def test_the_special_prefix_is_what_the_tokenizer_adds_before_a_text(bos_tok):
    assert special_prefix(tiny_tokenizer()) == []
    assert special_prefix(bos_tok) == [bos_tok.bos_token_id]
    assert bos_tok("hi")["input_ids"][0] == bos_tok.bos_token_id  # the tokenizer itself adds it
    # a tokenizer that also appends a token after the text: only the prefix counts (encode adds the EOS)
    both = bos_tokenizer("<eos> $A <unk>")
    assert both("hi")["input_ids"][-1] == both.unk_token_id
    assert special_prefix(both) == [both.bos_token_id]


def test_encode_starts_with_bos_unlabelled_and_keeps_it_when_the_prompt_is_cut(bos_tok):
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    ids, labels = encode(Example("abc", "xy"), bos_tok, 64)
    body = bos_tok("abc", add_special_tokens=False)["input_ids"]
    answer = bos_tok("xy", add_special_tokens=False)["input_ids"] + [eos]
    assert ids == [bos, *body, *answer]
    assert labels == [IGNORE_INDEX] * (1 + len(body)) + answer
    # cut from the left: the BOS stays, then the end of the prompt (the cue), then the whole answer
    ids, labels = encode(Example("abcdefgh", "xy"), bos_tok, 5)
    assert ids == [bos, bos_tok.convert_tokens_to_ids("h"), *answer]
    assert labels[:2] == [IGNORE_INDEX] * 2
    # without a BOS tokenizer nothing changes
    plain = tiny_tokenizer()
    assert encode(Example("abc", "xy"), plain, 64)[0] == plain("abcxy", add_special_tokens=False)[
        "input_ids"
    ] + [eos]


def test_max_length_counts_the_bos(bos_tok):
    ex = [Example("abcd", "xy")]
    assert (
        fit_max_length(ex, bos_tok, None, None)[0] == fit_max_length(ex, tiny_tokenizer(), None, None)[0] + 1
    )


def test_every_batch_and_every_evaluation_starts_with_bos(bos_tok):
    """What the model is given in training batches, label and choice scoring, generation and perplexity:
    each row's first attended token is the BOS."""
    bos = bos_tok.bos_token_id
    model = tiny_model("tiny-llama").eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is not None and ids.shape[1] > 1:  # generation's later steps feed one token each
            seen.append((ids, mask if mask is not None else torch.ones_like(ids)))

    model.register_forward_pre_hook(record, with_kwargs=True)

    def firsts() -> list[int]:
        out = [int(ids[i][mask[i].bool()][0]) for ids, mask in seen for i in range(len(ids))]
        seen.clear()
        return out

    examples = [Example(f"Review {i}: fine\nSentiment:", " good", i % 2) for i in range(3)]
    classification_predictions(model, bos_tok, examples, ("bad", "good"), batch_size=2)
    assert firsts() == [bos] * 3 * 2  # each prompt with each of the two words (whole-word scoring)
    choice_predictions(model, bos_tok, [Example("Q: pick", " b", 1, ("a", "b"))])
    assert firsts() == [bos, bos]
    generate(model, bos_tok, ["Say:", "A longer prompt:"], max_new_tokens=3)
    assert firsts() == [bos, bos]  # left-padded: the first attended token
    perplexity(model, bos_tok, [Example("", "hello world")])
    assert firsts() == [bos]
    batch = StepBatches(examples, bos_tok, 3, 64, seed=0)[0]
    assert batch["input_ids"][:, 0].tolist() == [bos] * 3
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all()
    # a prompt longer than max_length keeps its BOS in evaluation too
    assert _prompt_ids(bos_tok, "abcdefgh", 3) == [bos, *bos_tok("gh", add_special_tokens=False)["input_ids"]]


def test_a_chat_template_that_writes_the_bos_gets_no_second(bos_tok):
    from neurontune.tasks import records_to_task

    bos_tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    records = [(f"line {i}", {"messages": msgs}) for i in range(4)]
    task = records_to_task("chat", records, records, bos_tok)
    ids, _ = encode(task.train[0], bos_tok, 64)
    assert task.train[0].prompt.startswith("<eos>")  # the template wrote the BOS as text
    assert ids[0] == bos_tok.bos_token_id and ids[1] != bos_tok.bos_token_id

"""Tasks: examples as ``prompt -> completion`` pairs, how to batch them, and how to judge the output.

Every task is cast as causal LM: the loss is on completion tokens only (prompt and padding are
labelled ``-100``). A :class:`Task` also says how it is evaluated (``kind``):

- ``classification``: the completion is one of ``label_words``; accuracy compares the next-token
  logits of the label words' first tokens after the prompt.
- ``multiple_choice``: each example has its own ``choices`` (the completion is the right one);
  accuracy compares the choices' summed log-likelihoods after the prompt (BIG-bench's
  ``multiple_choice_grade``).
- ``exact_match``: greedy generation, the first number in the output against the target.
- ``generation``: greedy generation, BLEU / chrF (sacrebleu), ROUGE-L and exact match.
- ``text``: plain language modelling; perplexity.

Built-in tasks come from the embedded data (:mod:`neurontune.data`); any JSON/JSONL/CSV file in one
of the shapes of :data:`FORMATS` works too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from neurontune.data import (
    LABEL_WORDS,
    load_bigbench,
    load_dataset_records,
    load_news,
    load_records,
    movie_review_rows,
    rename_columns,
    split,
)
from neurontune.errors import NeurontuneError

IGNORE_INDEX = -100
KINDS = ("classification", "multiple_choice", "exact_match", "generation", "text")


@dataclass
class Example:
    prompt: str
    completion: str
    label: int | None = None  # index into Task.label_words (classification) or choices (multiple choice)
    choices: tuple[str, ...] = ()  # multiple choice: the candidate completions, completion among them
    general: bool = False  # general text mixed in against forgetting (gates' distill_general), not the task


@dataclass
class Task:
    name: str
    kind: str
    train: list[Example]
    eval: list[Example]
    label_words: tuple[str, ...] = ()
    max_new_tokens: int = 64
    stop: str | None = None  # generation is cut at the first occurrence (besides EOS)
    info: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None  # the primary metric, if not the kind's usual one (evaluation.primary_metric)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise NeurontuneError(f"task kind must be one of {KINDS}, got {self.kind!r}")
        if not self.train:
            raise NeurontuneError(f"task {self.name}: no training examples")
        if not self.eval:
            raise NeurontuneError(f"task {self.name}: no evaluation examples")

    def head(self, n_train: int | None = None, n_eval: int | None = None) -> Task:
        """The same task with at most ``n_train`` / ``n_eval`` examples (the first ones of each split)."""
        return dataclasses.replace(self, train=self.train[:n_train], eval=self.eval[:n_eval])

    def validation(self, fraction: float = 0.1) -> Task:
        """The task for tuning: the last ``fraction`` of the train split becomes the evaluation set (and
        leaves training); the test split is not used."""
        n = max(1, int(len(self.train) * fraction))
        if n >= len(self.train):
            raise NeurontuneError(f"task {self.name}: too few training examples for a validation split")
        return dataclasses.replace(self, train=self.train[:-n], eval=self.train[-n:])


# ---- built-in tasks --------------------------------------------------------------------------------
def sentiment_prompt(text: str, max_chars: int = 600) -> str:
    return f"Review: {text[:max_chars]}\nSentiment:"


def sentiment_examples(rows: Sequence[dict]) -> list[Example]:
    return [
        Example(sentiment_prompt(r["text"]), " " + LABEL_WORDS[int(r["label"])], int(r["label"]))
        for r in rows
    ]


def _movie_task(source: str, seed: int) -> Task:
    train, test = movie_review_rows(source, seed=seed)
    return Task(source, "classification", sentiment_examples(train), sentiment_examples(test), LABEL_WORDS)


def _multiemo(name: str, source: str, prompt: str, seed: int) -> Task:
    words = ("negative", "neutral", "positive", "ambivalent")
    rows = []
    for ex in load_bigbench(source)["examples"]:
        word = max(ex["target_scores"], key=ex["target_scores"].get)
        rows.append(Example(f"{prompt}: {ex['input'][:600]}\nSentiment:", " " + word, words.index(word)))
    train, test = split(rows, 0.1, seed)
    return Task(name, "classification", train, test, words)


def _e2e_nlg(seed: int) -> Task:
    rows = [
        Example(f"Restaurant attributes: {ex['input']}\nDescription:", " " + ex["target"])
        for ex in load_bigbench("gem/e2e_nlg")["examples"]
    ]
    train, test = split(rows, 0.1, seed)
    return Task("e2e_nlg", "generation", train, test, max_new_tokens=48, stop="\n")


def _arithmetic(seed: int) -> Task:
    rows = []
    for d in (1, 2):
        for op in ("addition", "subtraction"):
            for ex in load_bigbench(f"arithmetic/{d}_digit_{op}")["examples"]:
                rows.append(Example(f"Q: {ex['input']}\nA:", " " + ex["target"]))
    train, test = split(rows, 0.1, seed)
    return Task("arithmetic", "exact_match", train, test, max_new_tokens=6, stop="\n")


def bigbench_choice_examples(task: str, template: str = "{input}\nAnswer:") -> list[Example]:
    """A BIG-bench multiple-choice task (``target_scores``) as examples: the choices in the task's order,
    the first one scored 1 the answer; the choice text is what follows the prompt (after a space)."""
    rows = []
    for ex in load_bigbench(task)["examples"]:
        choices = tuple(c.strip() for c in ex["target_scores"])
        scores = list(ex["target_scores"].values())
        right = scores.index(max(scores))
        rows.append(Example(template.format(input=ex["input"].strip()), " " + choices[right], right, choices))
    return rows


def _choice_task(name: str, task: str, seed: int, template: str = "{input}\nAnswer:") -> Task:
    train, test = split(bigbench_choice_examples(task, template), 0.1, seed)
    return Task(name, "multiple_choice", train, test)


def _mapping_task(name: str, source: str, template: str, seed: int, max_new_tokens: int, stop: str) -> Task:
    """A BIG-bench input -> target mapping (linguistic_mappings) scored by exact match."""
    rows = [
        Example(template.format(input=ex["input"]), " " + ex["target"])
        for ex in load_bigbench(source)["examples"]
    ]
    train, test = split(rows, 0.1, seed)
    return Task(
        name, "generation", train, test, max_new_tokens=max_new_tokens, stop=stop, metric="exact_match"
    )


BUILTIN_TASKS: dict[str, Callable[[int], Task]] = {
    "rotten_tomatoes": lambda seed: _movie_task("rotten_tomatoes", seed),
    "imdb": lambda seed: _movie_task("imdb", seed),
    "multiemo": lambda seed: _multiemo("multiemo", "multiemo/all_text_en", "Opinion", seed),
    "product_sentiment": lambda seed: _multiemo(
        "product_sentiment", "multiemo/products_sentence_en", "Sentence from a product review", seed
    ),
    "e2e_nlg": _e2e_nlg,
    "arithmetic": _arithmetic,
    "hyperbaton": lambda seed: _choice_task("hyperbaton", "hyperbaton", seed),
    "unit_identification": lambda seed: _choice_task(
        "unit_identification", "unit_conversion/unit_identification", seed
    ),
    "sports_understanding": lambda seed: _choice_task(
        "sports_understanding", "sports_understanding", seed, "Statement: {input}\nPlausible or implausible?"
    ),
    "vitaminc": lambda seed: _choice_task(
        "vitaminc", "vitaminc_fact_verification", seed, "{input}\nTrue, False, or Neither?"
    ),
    "si_conversion": lambda seed: _choice_task(
        "si_conversion", "unit_conversion/si_conversion", seed, "{input}"
    ),
    "past_tense": lambda seed: _mapping_task(
        "past_tense", "linguistic_mappings/past_tense_json", "Today I {input}. Yesterday I", seed, 8, "."
    ),
    "negation": lambda seed: _mapping_task(
        "negation",
        "linguistic_mappings/sentence_negation_json",
        "Sentence: {input}\nNegated:",
        seed,
        16,
        "\n",
    ),
}


def general_text(n: int = 32, max_chars: int = 2000) -> list[str]:
    """Held-out news articles (the last ``n`` of the Lee background corpus) for measuring forgetting as
    perplexity."""
    return [t[:max_chars] for t in load_news()[-n:]]


def general_train_text(n: int, max_chars: int | None = 2000) -> list[str]:
    """News articles for training on general text (the first ``n``; :func:`general_text` takes its
    held-out ones from the other end of the same file, so the two never overlap). More than there are
    besides the held-out 32 is an error, not a shorter list. ``max_chars=None``: whole articles."""
    articles = load_news()
    if n > len(articles) - 32:
        raise NeurontuneError(
            f"{n} news articles asked for training; the corpus has {len(articles) - 32} besides the 32 held out "
            "for the forgetting measure"
        )
    return [t[:max_chars] for t in articles[: max(0, n)]]


def text_windows(texts: Sequence[str], tok: PreTrainedTokenizerBase, max_length: int) -> list[Example]:
    """Prompt-less examples (every token labelled) that cover every token of ``texts`` in consecutive
    windows which fit ``max_length`` with what :func:`encode` adds (the special prefix, EOS): a text
    longer than ``max_length`` would otherwise train on its start alone (a 250-token news article on its
    first 76 tokens beside a classification task's short examples)."""
    room = max(1, max_length - len(special_prefix(tok)) - 1)
    windows = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        windows += [
            Example("", tok.decode(ids[i : i + room]), general=True) for i in range(0, len(ids), room)
        ]
    return windows


# ---- tasks from files ------------------------------------------------------------------------------
# name -> (required fields, optional fields); detected from the first record, in this order.
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chat": (("messages",), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "multiple_choice": (("prompt", "choices", "answer"), ()),
    "prompt_completion": (("prompt", "completion"), ()),
    "classification": (("text", "label"), ()),
    "text": (("text",), ()),
}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


def detect_format(record: dict[str, Any], where: str) -> str:
    for name, (required, _) in FORMATS.items():
        if all(k in record for k in required):
            return name
    shapes = "; ".join(f"{n}: {', '.join(r)}" for n, (r, _) in FORMATS.items())
    raise NeurontuneError(
        f"{where}: unrecognised record with fields {sorted(record)}; expected one of: {shapes}"
    )


def _chat_example(msgs: Any, tok: PreTrainedTokenizerBase | None, where: str) -> Example:
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise NeurontuneError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for m in msgs:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise NeurontuneError(f"{where}: every message needs string 'role' and 'content' fields")
    if msgs[-1]["role"] != "assistant":
        raise NeurontuneError(f"{where}: the last message must be the assistant's (it is the completion)")
    if tok is None or not getattr(tok, "chat_template", None):
        raise NeurontuneError(f"{where}: chat data needs a tokenizer with a chat template")
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise NeurontuneError(f"{where}: the chat template does not render the prompt as a prefix")
    # loss on the last assistant turn (earlier turns are context), template's end-of-turn included
    return Example(prompt, full[len(prompt) :].rstrip("\n"))


def _str_field(rec: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    v = rec.get(key)
    if v is None or (isinstance(v, str) and not v.strip() and required):
        if required:
            raise NeurontuneError(f"{where}: missing or empty field {key!r}")
        return ""
    if not isinstance(v, str | int | float):
        raise NeurontuneError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return str(v)


def _first_duplicate(items: Any) -> str | None:
    seen: set[str] = set()
    for x in items:
        if x in seen:
            return x
        seen.add(x)
    return None


def _choice_example(rec: dict[str, Any], where: str) -> Example:
    """``{"prompt", "choices": [...], "answer": index or the right choice's text}``."""
    choices = rec["choices"]
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        raise NeurontuneError(f"{where}: 'choices' must be a list of two or more non-empty strings")
    if dup := _first_duplicate(c.strip() for c in choices):  # ties go to the first: the second never wins
        raise NeurontuneError(f"{where}: the choice {dup!r} is listed twice; each choice must be distinct")
    answer = rec["answer"]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise NeurontuneError(f"{where}: answer {answer} is out of range for {len(choices)} choices")
        idx = answer
    elif isinstance(answer, str) and answer in choices:
        idx = choices.index(answer)
    else:
        raise NeurontuneError(
            f"{where}: answer {answer!r} is neither a choice's index nor one of the choices"
        )
    return Example(
        _str_field(rec, "prompt", where), " " + choices[idx].strip(), idx, tuple(c.strip() for c in choices)
    )


def records_to_task(
    name: str,
    records: Sequence[tuple[str, dict[str, Any]]],
    eval_records: Sequence[tuple[str, dict[str, Any]]] | None,
    tok: PreTrainedTokenizerBase | None,
    *,
    seed: int = 0,
    eval_fraction: float = 0.1,
    label_words: Sequence[str] | None = None,
    template: str = "{text}\nLabel:",
) -> Task:
    """Turn ``(where, record)`` pairs into a :class:`Task`; the format is detected from the first record."""
    fmt = detect_format(records[0][1], records[0][0])
    for where, rec in [*records[1:], *(eval_records or [])]:
        try:
            other = detect_format(rec, where)
        except NeurontuneError:
            continue  # fits no shape: converting it names the missing field
        if other != fmt:
            raise NeurontuneError(
                f"{where}: a {other!r} record in a {fmt!r} file (the first record's format); every record "
                "must have the same shape"
            )
    required, _ = FORMATS[fmt]
    words = tuple(label_words or ())
    if dup := _first_duplicate(words):  # a label at the second copy could never be predicted right
        raise NeurontuneError(f"label_words lists {dup!r} twice; each label needs its own word")
    if fmt == "classification":
        for where, rec in [*records, *(eval_records or [])]:
            if rec.get("label") is None or not str(rec["label"]).strip():
                raise NeurontuneError(f"{where}: empty label")
    if fmt == "classification" and not words:
        words = tuple(sorted({str(r["label"]).strip() for _, r in [*records, *(eval_records or [])]}))
        if any(w.lstrip("-").isdigit() for w in words):
            raise NeurontuneError(
                f"{name}: integer labels {list(words)} need a verbaliser: label_words=negative,positive"
            )
        if len(words) < 2:
            raise NeurontuneError(
                f"{name}: every label is {words[0]!r}; a classification task needs two or more"
            )

    def convert(where: str, rec: dict[str, Any]) -> Example:
        for k in required:
            if k not in rec:
                raise NeurontuneError(f"{where}: missing field {k!r} (the file's format is {fmt!r})")
        if fmt == "chat":
            return _chat_example(rec["messages"], tok, where)
        if fmt == "alpaca":
            inp = _str_field(rec, "input", where, required=False)
            prompt = ALPACA_PROMPT.format(
                ctx=", paired with an input that provides further context" if inp else "",
                instruction=_str_field(rec, "instruction", where),
                input=f"### Input:\n{inp}\n\n" if inp else "",
            )
            return Example(prompt, _str_field(rec, "output", where))
        if fmt == "prompt_completion":
            return Example(_str_field(rec, "prompt", where), _str_field(rec, "completion", where))
        if fmt == "multiple_choice":
            return _choice_example(rec, where)
        text = _str_field(rec, "text", where)
        if fmt == "text":
            return Example("", text)
        raw = str(rec["label"]).strip()
        if raw.lstrip("-").isdigit() and label_words:
            idx = int(raw)
            if not 0 <= idx < len(words):
                raise NeurontuneError(f"{where}: label {idx} out of range for label_words {list(words)}")
        elif raw in words:
            idx = words.index(raw)
        else:
            raise NeurontuneError(f"{where}: label {raw!r} is not one of {list(words)}")
        try:
            prompt = template.format(text=text)
        except (KeyError, IndexError) as e:
            raise NeurontuneError(f"template {template!r} may only use the field {{text}} ({e})") from None
        return Example(prompt, " " + words[idx], idx)

    examples = [convert(w, r) for w, r in records]
    if eval_records is not None:
        if detect_format(eval_records[0][1], eval_records[0][0]) != fmt:
            raise NeurontuneError(f"{name}: the eval file's format differs from the training file's ({fmt})")
        train, test = examples, [convert(w, r) for w, r in eval_records]
    else:
        if len(examples) < 2:
            raise NeurontuneError(f"{name}: need at least 2 records to hold some out for evaluation")
        train, test = split(examples, eval_fraction, seed)
    kinds = {"classification": "classification", "text": "text", "multiple_choice": "multiple_choice"}
    kind = kinds.get(fmt, "generation")
    return Task(name, kind, train, test, words, info={"format": fmt})


def load_task(
    name_or_path: str,
    tok: PreTrainedTokenizerBase | None = None,
    *,
    seed: int = 0,
    eval_file: str | None = None,
    eval_fraction: float = 0.1,
    label_words: Sequence[str] | None = None,
    template: str = "{text}\nLabel:",
    columns: dict[str, str] | None = None,
    sample: int | None = None,
    eval_sample: int | None = None,
) -> Task:
    """A built-in task by name (:data:`BUILTIN_TASKS`), a data file, a ``datasets`` directory
    (``save_to_disk``) or a Hub dataset id; ``columns`` renames the data's columns to our fields.
    ``sample`` / ``eval_sample``: read at most that many records of the data / eval file (a seeded uniform
    sample of a bigger file, streamed; :func:`~neurontune.data.load_records`)."""
    if name_or_path in BUILTIN_TASKS:
        if eval_file:
            raise NeurontuneError("eval_file is for data files; built-in tasks have their own test split")
        return BUILTIN_TASKS[name_or_path](seed)
    path = Path(name_or_path)
    if path.is_dir() or (not path.suffix and "/" in name_or_path and not path.exists()):
        records, eval_records = load_dataset_records(name_or_path)  # save_to_disk directory or Hub id
    elif not path.suffix:
        raise NeurontuneError(
            f"unknown task {name_or_path!r}: use one of {sorted(BUILTIN_TASKS)}, a .json/.jsonl/.csv file, "
            "a datasets directory (save_to_disk) or a Hub dataset id (org/name)"
        )
    else:
        records, eval_records = load_records(name_or_path, sample, seed), None
    if eval_file:
        eval_records = load_records(eval_file, eval_sample, seed)
    if columns:
        records = rename_columns(records, columns)
        eval_records = rename_columns(eval_records, columns) if eval_records is not None else None
    return records_to_task(
        os.path.basename(name_or_path), records, eval_records, tok, seed=seed,
        eval_fraction=eval_fraction, label_words=label_words, template=template,
    )  # fmt: skip


# ---- encoding and batching -------------------------------------------------------------------------
_PREFIXES: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()


def special_prefix(tok: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens ``tok`` puts before a text of its own accord: Llama-3's ``<|begin_of_text|>``,
    Mistral's and Gemma's ``<s>``/``<bos>``; ``[]`` for GPT-2 or SmolLM2, which add none. Every prompt
    starts with them, as the model saw in pre-training and as ``tok(text)`` and chat templates give."""
    try:
        return _PREFIXES[tok]
    except (KeyError, TypeError):
        pass
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    prefix = list(full[:at])
    with contextlib.suppress(TypeError):  # a tokenizer that takes no weak reference is asked each time
        _PREFIXES[tok] = prefix
    return prefix


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """A prompt's token ids after the tokenizer's :func:`special_prefix`, once: a prompt that already
    starts with it (a chat template that writes ``{{ bos_token }}``, as Llama-3's does) gets no second."""
    prefix = special_prefix(tok)
    body = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    return body if prefix and body[: len(prefix)] == prefix else prefix + body


def cut_prompt(ids: list[int], room: int, keep: int = 0) -> list[int]:
    """``ids`` cut from the left to at most ``room`` tokens, keeping its first ``keep`` (the special prefix)
    and then its end (the cue next to the answer)."""
    if len(ids) <= room:
        return ids
    keep = min(keep, room)
    return ids[:keep] + ids[len(ids) - (room - keep) :] if room > keep else ids[:keep]


def encode(ex: Example, tok: PreTrainedTokenizerBase, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels; the prompt (after the tokenizer's BOS, if it adds one) is cut from the left,
    keeping its end (the cue), never the answer."""
    p = prompt_ids(tok, ex.prompt)
    c = tok(ex.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    c = c[:max_length]
    p = cut_prompt(p, max(0, max_length - len(c)), len(special_prefix(tok)))
    return p + c, [IGNORE_INDEX] * len(p) + c


def model_length_limit(model: Any, tok: PreTrainedTokenizerBase | None = None) -> int | None:
    """The longest sequence ``model`` takes (its position table), or the tokenizer's limit; ``None``: unknown."""
    cfg = getattr(model, "config", None)
    limits = [
        getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
    ]
    limits.append(getattr(tok, "model_max_length", None))
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10**7]
    return min(limits) if limits else None


def fit_max_length(
    examples: Sequence[Example], tok: PreTrainedTokenizerBase, max_length: int | None, limit: int | None
) -> tuple[int, str | None]:
    """``max_length`` (``None``: the longest of ``examples`` in tokens, up to ``limit``) and a note when
    examples are longer and lose the start of their prompt (``None``: none is cut)."""
    lengths = [
        len(prompt_ids(tok, e.prompt)) + len(tok(e.completion, add_special_tokens=False)["input_ids"]) + 1
        for e in examples
    ]
    longest = max(lengths, default=2)
    n = max_length if max_length is not None else min(longest, limit or longest)
    n = max(n, 2)
    cut = sum(length > n for length in lengths)
    note = None
    if cut:
        why = "" if max_length is not None else f" (the model's limit; longest example {longest:,})"
        note = (
            f"note: {cut:,} of {len(lengths):,} examples are longer than max_length={n:,} tokens{why} and "
            "lose the start of their prompt"
        )
    return n, note


def collate(
    encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, left: bool = False
) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence (right by default); padding gets attention 0 and label -100."""
    n = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        sl = slice(n - len(x), n) if left else slice(0, len(x))
        ids[i, sl] = torch.tensor(x)
        labels[i, sl] = torch.tensor(y)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class StepBatches:
    """Training micro-batches as a pure function of ``(seed, index)``: a fresh seeded permutation per
    epoch, incomplete last batch dropped. Resuming at step ``s`` needs no replay of the data stream.
    Where some examples are general text (``Example.general``), every batch also holds ``general``,
    a boolean per example.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tok: PreTrainedTokenizerBase,
        batch_size: int,
        max_length: int,
        seed: int,
    ) -> None:
        if not examples:
            raise NeurontuneError("no training examples")
        self.encoded = [encode(e, tok, max_length) for e in examples]
        self.general = [e.general for e in examples] if any(e.general for e in examples) else None
        self.batch_size = min(batch_size, len(self.encoded))
        self.per_epoch = len(self.encoded) // self.batch_size
        self.seed, self.pad_id = seed, tok.pad_token_id
        self._perm: tuple[int, list[int]] | None = None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(index, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.encoded), generator=g).tolist())
        idx = self._perm[1][pos * self.batch_size : (pos + 1) * self.batch_size]
        batch = collate([self.encoded[j] for j in idx], self.pad_id)
        if self.general is not None:
            batch["general"] = torch.tensor([self.general[j] for j in idx])
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        i = 0
        while True:
            yield self[i]
            i += 1


def fixed_batches(
    examples: Sequence[Example], tok: PreTrainedTokenizerBase, batch_size: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
    """The examples in order, as a finite list of batches (calibration data for scorers)."""
    encoded = [encode(e, tok, max_length) for e in examples]
    return [
        collate(encoded[i : i + batch_size], tok.pad_token_id) for i in range(0, len(encoded), batch_size)
    ]

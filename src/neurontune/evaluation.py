"""Evaluation: accuracy, exact match, BLEU/chrF/ROUGE-L, perplexity and forgetting.

All functions take any causal LM with the transformers calling convention: a plain model, a
:class:`~neurontune.rowtune.RowTuneModel` or a PEFT model.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from neurontune.io import read_json, write_json
from neurontune.tasks import (
    IGNORE_INDEX,
    Example,
    Task,
    collate,
    cut_prompt,
    encode,
    model_length_limit,
    prompt_ids,
    special_prefix,
)

_NUMBER = re.compile(r"[-+]?\d+")


def _prompt_ids(tok: PreTrainedTokenizerBase, prompt: str, max_length: int) -> list[int]:
    """The prompt's ids (the tokenizer's BOS first, if it adds one) cut to ``max_length`` from the left."""
    ids = cut_prompt(prompt_ids(tok, prompt), max_length, len(special_prefix(tok)))
    return ids or [tok.eos_token_id]


def keeps_logits(model: Any) -> bool:
    """Whether ``model`` (a transformers causal LM, or a wrapper passing keywords on to it: PEFT, gates)
    takes ``logits_to_keep``: the head then runs on the positions asked for only. At a 128k vocabulary the
    logits of every position of a batch of 16 x 256 tokens are 2 GiB in fp32 (and as much again for
    their log-softmax)."""
    import inspect

    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return hf is not None and "logits_to_keep" in inspect.signature(type(hf).forward).parameters


def label_token_ids(tok: PreTrainedTokenizerBase, label_words: Sequence[str]) -> list[int] | None:
    """First token of each ``" word"``, or None if two words share it (then whole words are scored)."""
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in label_words]
    return ids if len(set(ids)) == len(ids) else None


@torch.no_grad()
def _choice_logprobs(
    model: Any, tok: PreTrainedTokenizerBase, prompts: list[list[int]], choices: Sequence[Sequence[str]],
    max_length: int | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """Sum of log-probabilities of each choice's tokens (``" " + choice``) after its prompt, one tensor of
    ``len(choices[i])`` scores per prompt; one forward for all pairs. With ``max_length``, a prompt is cut
    from the left so that prompt and choice fit in it (as training cuts them)."""
    words = [[tok(" " + c, add_special_tokens=False)["input_ids"] for c in cs] for cs in choices]
    n_special = len(special_prefix(tok))

    def fit(p: list[int], w: list[int]) -> list[int]:
        return p if max_length is None else cut_prompt(p, max(1, max_length - len(w)), n_special)

    pairs = [
        (q + w, [IGNORE_INDEX] * len(q) + w)
        for p, ws in zip(prompts, words, strict=True)
        for w in ws
        for q in (fit(p, w),)
    ]
    b = collate(pairs, tok.pad_token_id)
    device = next(model.parameters()).device
    ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
    labels = b["labels"][:, 1:]  # position t predicts token t + 1
    if keeps_logits(model):  # the head (and the softmax) on the positions that predict a choice token only
        at = torch.nonzero((labels != IGNORE_INDEX).any(0)).squeeze(-1)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=at.to(device)).logits
        labels = labels[:, at]
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = labels.to(device)
    lp = torch.log_softmax(logits.float(), -1)
    tok_lp = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != IGNORE_INDEX)
    return list(tok_lp.sum(-1).cpu().split([len(ws) for ws in words]))


def _label_logprobs(
    model: Any, tok: PreTrainedTokenizerBase, prompts: list[list[int]], label_words: Sequence[str],
    max_length: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Sum of log-probabilities of each label word's tokens after each prompt: ``[n_prompts, n_labels]``."""
    return torch.stack(_choice_logprobs(model, tok, prompts, [label_words] * len(prompts), max_length))


def choice_predictions(
    model: Any,
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int = 256,
    batch_size: int = 16,
) -> list[int]:
    """The index of each example's most likely choice (summed log-likelihood of its tokens)."""
    model.eval()
    preds: list[int] = []
    per_batch = max(1, batch_size // max(1, max(len(e.choices) for e in examples)))
    for start in tqdm(range(0, len(examples), per_batch), desc="eval", leave=False):
        chunk = examples[start : start + per_batch]
        enc = [_prompt_ids(tok, e.prompt, max_length) for e in chunk]
        scores = _choice_logprobs(model, tok, enc, [e.choices for e in chunk], max_length)
        preds += [int(s.argmax()) for s in scores]
    return preds


@torch.no_grad()
def classification_predictions(
    model: Any,
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    label_words: Sequence[str],
    max_length: int = 256,
    batch_size: int = 16,
) -> list[int]:
    """The index of the most likely label word after each prompt.

    One forward per batch compares the next-token logits of the words' first tokens; when two words
    share a first token (e.g. a byte-level tokenizer), the full words' log-likelihoods are compared.
    """
    word_ids = label_token_ids(tok, label_words)
    model.eval()
    device = next(model.parameters()).device
    preds: list[int] = []
    for start in tqdm(range(0, len(examples), batch_size), desc="eval", leave=False):
        chunk = examples[start : start + batch_size]
        enc = [_prompt_ids(tok, e.prompt, max_length) for e in chunk]
        if word_ids is None:
            scores = _label_logprobs(model, tok, enc, label_words, max_length)
        else:
            batch = collate([(e, e) for e in enc], tok.pad_token_id)
            last = batch["attention_mask"].sum(1) - 1
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            if keeps_logits(model):  # the head on the prompts' last positions only, not on every token
                at = torch.unique(last)
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=at.to(device)).logits
                last = torch.searchsorted(at, last)
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
            scores = logits[torch.arange(len(chunk)), last.to(device)][:, word_ids].cpu()
        preds += scores.argmax(-1).tolist()
    return preds


def classification_accuracy(
    model: Any,
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    label_words: Sequence[str],
    max_length: int = 256,
    batch_size: int = 16,
) -> float:
    """Accuracy of the most likely label word after each prompt (:func:`classification_predictions`)."""
    return _accuracy(
        classification_predictions(model, tok, examples, label_words, max_length, batch_size), examples
    )


def _accuracy(preds: Sequence[int], examples: Sequence[Example]) -> float:
    return sum(p == e.label for p, e in zip(preds, examples, strict=True)) / max(1, len(examples))


@torch.no_grad()
def generate(
    model: Any,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    stop: str | None = None,
    max_length: int = 256,
    batch_size: int = 16,
) -> list[str]:
    """Greedy completions (left-padded batches), cut at ``stop`` if given."""
    model.eval()
    device = next(model.parameters()).device
    limit = model_length_limit(model)  # the prompt and the new tokens must fit the position table
    keep = min(max_length, limit - max_new_tokens) if limit and limit > max_new_tokens else max_length
    outs: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False):
        enc = [_prompt_ids(tok, p, keep) for p in prompts[start : start + batch_size]]
        batch = collate([(e, e) for e in enc], tok.pad_token_id, left=True)
        seq = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        for row in seq[:, batch["input_ids"].shape[1] :]:
            text = tok.decode(row, skip_special_tokens=True)
            outs.append(text.split(stop)[0] if stop else text)
    return outs


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu), mean ROUGE-L F1 (rouge-score) and exact match, in percent."""
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rl = [rouge.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs, strict=True)]
    return {
        "bleu": sacrebleu.corpus_bleu(preds, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(preds, [refs]).score,
        "rougeL": 100 * sum(rl) / max(1, len(rl)),
        "exact_match": 100 * sum(p == r for p, r in zip(preds, refs, strict=True)) / max(1, len(refs)),
    }


def number_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percent of outputs whose first integer equals the reference's."""
    hits = 0
    for p, r in zip(predictions, references, strict=True):
        m = _NUMBER.search(p)
        hits += bool(m) and m.group() == r.strip()
    return 100 * hits / max(1, len(references))


@torch.no_grad()
def perplexity(
    model: Any,
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int = 256,
    batch_size: int = 8,
) -> float:
    """exp(mean NLL per completion token); for plain text (empty prompts) every token counts."""
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        enc = [encode(e, tok, max_length) for e in examples[start : start + batch_size]]
        b = collate(enc, tok.pad_token_id)
        logits = model(
            input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)
        ).logits
        labels = b["labels"][:, 1:].to(device)
        nll += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    return math.exp(nll / max(1, count))


def evaluate(
    model: Any,
    tok: PreTrainedTokenizerBase,
    task: Task,
    *,
    max_length: int = 256,
    batch_size: int = 16,
    general_text: Sequence[str] = (),
    samples: int = 5,
    general_length: int | None = None,
) -> dict[str, Any]:
    """Task metrics on ``task.eval`` (plus ``forgetting_ppl`` on ``general_text`` if given, over windows
    of ``general_length`` tokens; default ``max_length``)."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"eval_examples": len(task.eval)}
    if task.kind == "classification":
        preds = classification_predictions(model, tok, task.eval, task.label_words, max_length, batch_size)
        out["accuracy"] = _accuracy(preds, task.eval)
        # the share of the examples given each label: a model whose answers drift to one label (a shifted
        # calibration) shows it here before its accuracy says why
        out["label_shares"] = {w: preds.count(i) / max(1, len(preds)) for i, w in enumerate(task.label_words)}
        out["samples"] = [
            {"prompt": e.prompt, "prediction": task.label_words[p], "reference": task.label_words[e.label]}
            for e, p in zip(task.eval[:samples], preds[:samples], strict=True)
        ]
    elif task.kind == "multiple_choice":
        preds = choice_predictions(model, tok, task.eval, max_length, batch_size)
        out["accuracy"] = _accuracy(preds, task.eval)
        out["samples"] = [
            {"prompt": e.prompt, "prediction": e.choices[p], "reference": e.choices[e.label]}
            for e, p in zip(task.eval[:samples], preds[:samples], strict=True)
        ]
    elif task.kind == "text":
        out["perplexity"] = perplexity(model, tok, task.eval, max_length, batch_size)
    else:
        preds = generate(
            model, tok, [e.prompt for e in task.eval], task.max_new_tokens, task.stop, max_length, batch_size
        )
        refs = [e.completion for e in task.eval]
        if task.kind == "exact_match":
            out["exact_match"] = number_exact_match(preds, refs)
        else:
            out.update(generation_metrics(preds, refs))
        out["samples"] = [
            {"prompt": e.prompt, "prediction": p, "reference": e.completion}
            for e, p in zip(task.eval[:samples], preds[:samples], strict=True)
        ]
    if general_text:
        out["forgetting_ppl"] = perplexity(
            model, tok, [Example("", t) for t in general_text], general_length or max_length
        )
    out["eval_seconds"] = time.perf_counter() - t0
    return out


NOT_METRICS = ("eval_examples", "eval_seconds")  # numbers evaluate() returns that describe the evaluation


def metric_names(results: dict[str, Any] | None) -> list[str]:
    """The metrics among ``evaluate``'s results (numbers, without the evaluation's size and time)."""
    return [
        k for k, v in (results or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in NOT_METRICS
    ]  # fmt: skip


class EvalCurve:
    """Evaluations during training (``eval_steps``), kept in ``eval_log.json`` as ``{"metric": ...,
    "points": [{"step": s, <metric>: value, ...}]}``, rewritten atomically after each; a resumed run
    keeps the points before its checkpoint and replaces later ones."""

    def __init__(self, path: Path, metric: str) -> None:
        self.path, self.metric = path, metric
        old = read_json(path, "evaluation log") if path.is_file() else {}
        self.points = {int(p["step"]): p for p in old.get("points", [])} if isinstance(old, dict) else {}

    def add(self, step: int, results: dict[str, Any]) -> dict[str, float]:
        numbers = {k: results[k] for k in metric_names(results)}
        self.points = {s: p for s, p in self.points.items() if s < step}
        shares = {"label_shares": results["label_shares"]} if "label_shares" in results else {}
        self.points[step] = {"step": step, **numbers, **shares}
        write_json(
            self.path, {"metric": self.metric, "points": [self.points[s] for s in sorted(self.points)]}
        )
        return numbers


def task_metrics(task: Task) -> tuple[str, ...]:
    """The metrics :func:`evaluate` measures for ``task`` (before any ``forgetting_ppl``)."""
    kinds = {"classification": ("accuracy",), "multiple_choice": ("accuracy",), "text": ("perplexity",),
             "exact_match": ("exact_match",)}  # fmt: skip
    return kinds.get(task.kind, ("bleu", "chrf", "rougeL", "exact_match"))


def primary_metric(task: Task) -> str:
    if task.metric:
        return task.metric
    kinds = {"classification": "accuracy", "multiple_choice": "accuracy", "exact_match": "exact_match"}
    return kinds.get(task.kind, "perplexity" if task.kind == "text" else "rougeL")

"""Turning examples into causal-LM training batches with loss on completion tokens only.

Sentiment classification is cast as ``prompt -> " positive" / " negative"``; padding and prompt
tokens are labelled ``-100`` so they never contribute to the loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from neurontune.data import LABEL_WORDS

IGNORE_INDEX = -100


def sentiment_prompt(text: str, max_chars: int = 600) -> str:
    return f"Review: {text[:max_chars]}\nSentiment:"


@dataclass
class Example:
    prompt: str
    completion: str


def sentiment_examples(rows: Sequence[dict]) -> list[Example]:
    return [Example(sentiment_prompt(r["text"]), " " + LABEL_WORDS[int(r["label"])]) for r in rows]


def encode(ex: Example, tok: PreTrainedTokenizerBase, max_length: int) -> tuple[list[int], list[int]]:
    p = tok(ex.prompt, add_special_tokens=False)["input_ids"]
    c = tok(ex.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    p = p[: max(0, max_length - len(c))]  # truncate the prompt, never the answer
    return p + c, [IGNORE_INDEX] * len(p) + c


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding gets attention 0 and label -100."""
    n = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(
    examples: Sequence[Example], tok: PreTrainedTokenizerBase, batch_size: int, max_length: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (a fresh permutation each epoch, seeded)."""
    encoded = [encode(e, tok, max_length) for e in examples]
    g = torch.Generator().manual_seed(seed)
    while True:
        for start in range(0, len(encoded) - batch_size + 1, batch_size):
            if start == 0:
                perm = torch.randperm(len(encoded), generator=g).tolist()
            yield collate([encoded[j] for j in perm[start : start + batch_size]], tok.pad_token_id)


@torch.no_grad()
def sentiment_accuracy(
    model, tok: PreTrainedTokenizerBase, rows: Sequence[dict], batch_size: int = 16
) -> float:
    """Accuracy from comparing the next-token logits of the two label words after the prompt."""
    word_ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS]
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = [tok(sentiment_prompt(r["text"]), add_special_tokens=False)["input_ids"][-256:] for r in chunk]
        batch = collate([(e, e) for e in enc], tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        last = batch["attention_mask"].sum(1) - 1
        pick = logits[torch.arange(len(chunk)), last][:, word_ids]
        correct += (pick.argmax(-1) == torch.tensor([int(r["label"]) for r in chunk])).sum().item()
    return correct / max(1, len(rows))


def fixed_batches(
    examples: Sequence[Example], tok: PreTrainedTokenizerBase, batch_size: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
    """The examples in order, as a finite list of batches (calibration data for scorers)."""
    encoded = [encode(e, tok, max_length) for e in examples]
    return [
        collate(encoded[i : i + batch_size], tok.pad_token_id) for i in range(0, len(encoded), batch_size)
    ]

r"""Logit distillation from a teacher (the unpruned model) into a student (the pruned one), as Minitron
recovers width-pruned models::

    loss = (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T)) + alpha * CE(s, labels)

The KL is summed over every next-token position that has a real next token (not only the labelled
completion: a classification example has one labelled token but a whole prompt of teacher
distribution) and divided by the step's count of such positions. The task loss is a mean over each
micro-batch's examples of each example's mean cross-entropy per labelled token, weighted by the
micro-batch's share of the step's positions, so ``alpha`` weighs a per-token KL against a per-example
task loss (a sum over one labelled token per example divided by some sixty positions would leave the
task loss almost no weight; a mean over labelled tokens would hand it to the general-text examples mixed
in, every token of which is labelled: one 250-token article beside seven one-token answers would take
97 % of it). ``T`` is the temperature.

A second teacher may take the general text mixed in against forgetting (the batches' ``general``
rows, :class:`~neurontune.tasks.StepBatches`): the model before task tuning, whose distribution on
news is the language model to keep, where the task-tuned teacher has already drifted from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neurontune.tasks import IGNORE_INDEX


def next_token_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mask over positions ``0 .. L-2`` whose next token is a real (attended) token."""
    am = batch["attention_mask"].bool()
    return am[:, :-1] & am[:, 1:]


def attended_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(next_token_positions(batch).sum())


def _kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, t: float
) -> torch.Tensor:
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(s, p, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() * t * t


def distill_loss(
    teacher: Callable[..., Any],
    temperature: float = 2.0,
    alpha: float = 0.0,
    general_teacher: Callable[..., Any] | None = None,
) -> Callable[[nn.Module, dict[str, torch.Tensor], int], torch.Tensor]:
    """A ``loss_fn`` for :func:`neurontune.train.train` (with ``count_fn=attended_tokens``);
    ``general_teacher``: the teacher of the batch's ``general`` rows (default: ``teacher``)."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            t_logits = teacher_logits(teacher, general_teacher, batch)
        s_logits = model(**inputs).logits[:, :-1]
        mask = next_token_positions(batch)
        total = (1 - alpha) * _kl_sum(s_logits, t_logits, mask, temperature) / n
        labels = batch["labels"][:, 1:]
        per_example = (labels != IGNORE_INDEX).sum(1)
        if alpha and (has := per_example > 0).any():
            ce = F.cross_entropy(s_logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none").view(labels.shape)  # fmt: skip
            ce = (ce.sum(1)[has] / per_example[has]).mean()
            total = total + alpha * ce * (int(mask.sum()) / n)
        return total

    return loss


def teacher_logits(
    teacher: Callable[..., Any], general_teacher: Callable[..., Any] | None, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The teachers' next-token logits (positions ``0 .. L-2``): ``general_teacher``'s on the ``general``
    rows, ``teacher``'s on the others; each teacher runs on its own rows only."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    general = batch.get("general") if general_teacher is not None else None
    if general is None or not general.any():
        return teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    if general.all():
        return general_teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    out = None
    for who, rows in ((teacher, ~general), (general_teacher, general)):
        logits = who(input_ids=ids[rows], attention_mask=mask[rows]).logits
        out = logits.new_empty((len(general), *logits.shape[1:])) if out is None else out
        out[rows] = logits
    return out[:, :-1]


@torch.no_grad()
def kl_to_teacher(model: nn.Module, teacher: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Mean KL(teacher || model) per next-token position at temperature 1 (a distillation's progress)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        mask = next_token_positions(b)
        total += float(_kl_sum(model(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1], mask, 1.0))
        count += int(mask.sum())
    return total / max(1, count)

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

``answer`` adds the same KL at the task's answer tokens only (the labelled positions of the task's
examples, not of the general text), as a mean per example weighed like the task loss::

    loss += answer * mean_examples(sum_answer T^2 KL / answer tokens) * (micro-batch positions / n)

The per-token KL gives a classification example's answer one position among some sixty, and the
general text's tokens outnumber the answers many times over; this term holds the teacher's decision, with
its probabilities, where the hard labels hold only the answer. Measured (README, 2026-12-07): gating
SmolLM2-135M for Rotten Tomatoes, the share of reviews the gated model calls negative wanders between
42 % and 74 % along the gate training (51.6 % are, the teacher says 60.6 %); at ``answer`` 5 it still
wanders (40 % to 78 %) and the news perplexity rises faster, so it is not on by default.

``hidden`` adds CoFi's layer-wise distillation: every decoder layer's output (the hidden states
``output_hidden_states`` returns, less the embeddings) pulled towards the teacher's at the same layer.
Pruning MLP channels and heads keeps the hidden size and the layer count, so the layers pair one to one
without CoFi's learned projection. The error at a position is the cosine distance
``1 - cos(h_s, h_t)``, averaged over the layers, summed over the same positions as the KL and divided by
the same count::

    loss += hidden * sum_pos mean_layers (1 - cos(h_s, h_t)) / n

Why not a squared error: each layer reads its input through an RMSNorm, which drops the scale, and a
few positions carry massive activations (norms of 20,000 against a median of 150 in SmolLM2-135M's
middle layers) that a pruned model may move to another token. On a 30 %-pruned SmolLM2-135M against its
teacher (8 news windows), the per-token relative squared error ``|h_s - h_t|^2 / |h_t|^2`` has a median
of 0.19 at every layer but a maximum of 2,010 (layer 12): its mean over positions would be those few
tokens' alone. The cosine distance is bounded (at most 2) and averaged 0.07-0.18 per layer there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neurontune.errors import NeurontuneError
from neurontune.tasks import IGNORE_INDEX


def next_token_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mask over positions ``0 .. L-2`` whose next token is a real (attended) token."""
    am = batch["attention_mask"].bool()
    return am[:, :-1] & am[:, 1:]


def attended_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(next_token_positions(batch).sum())


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))`` at every position."""
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="none").sum(-1) * t * t


def _kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, t: float
) -> torch.Tensor:
    return (_kl(student_logits, teacher_logits, t) * mask).sum()


def _hidden_sum(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Sum over ``mask``'s positions of the mean over layers of ``1 - cos(h_s, h_t)``."""
    if len(student) != len(teacher) or student[0].shape[-1] != teacher[0].shape[-1]:
        raise NeurontuneError(
            f"distill_hidden pairs the layers one to one: the student returns {len(student)} hidden states of "
            f"size {student[0].shape[-1]}, the teacher {len(teacher)} of size {teacher[0].shape[-1]}"
        )
    total = mask.new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher, strict=True):
        distance = 1 - F.cosine_similarity(s[:, :-1].float(), t[:, :-1].float(), dim=-1)
        total = total + (distance * mask).sum()
    return total / len(student)


def distill_loss(
    teacher: Callable[..., Any],
    temperature: float = 2.0,
    alpha: float = 0.0,
    general_teacher: Callable[..., Any] | None = None,
    hidden: float = 0.0,
    answer: float = 0.0,
) -> Callable[[nn.Module, dict[str, torch.Tensor], int], torch.Tensor]:
    """A ``loss_fn`` for :func:`neurontune.train.train` (with ``count_fn=attended_tokens``);
    ``general_teacher``: the teacher of the batch's ``general`` rows (default: ``teacher``); ``hidden``:
    the weight of the layer-wise hidden-state term (0: logits only); ``answer``: the weight of the KL at
    the task's answers (the labelled positions of the rows that are not ``general``), averaged per
    example and weighed like the task loss: the teacher's decision, with its calibration, which the
    per-token KL counts as one position among a prompt's."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if hidden:
            inputs["output_hidden_states"] = True
        with torch.no_grad():
            t_logits, t_hidden = teacher_outputs(teacher, general_teacher, batch, hidden=bool(hidden))
        out = model(**inputs)
        s_logits = out.logits[:, :-1]
        mask = next_token_positions(batch)
        kl = _kl(s_logits, t_logits, temperature)
        total = (1 - alpha) * (kl * mask).sum() / n
        if hidden:
            total = total + hidden * _hidden_sum(out.hidden_states[1:], t_hidden, mask) / n
        labels = batch["labels"][:, 1:]
        labelled = labels != IGNORE_INDEX
        per_example = labelled.sum(1)
        has = per_example > 0
        task = has & ~batch["general"].to(has.device) if "general" in batch else has
        if answer and task.any():
            kl_answer = ((kl * labelled).sum(1)[task] / per_example[task]).mean()
            total = total + answer * kl_answer * (int(mask.sum()) / n)
        if alpha and has.any():
            ce = F.cross_entropy(s_logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none").view(labels.shape)  # fmt: skip
            ce = (ce.sum(1)[has] / per_example[has]).mean()
            total = total + alpha * ce * (int(mask.sum()) / n)
        return total

    return loss


def teacher_outputs(
    teacher: Callable[..., Any],
    general_teacher: Callable[..., Any] | None,
    batch: dict[str, torch.Tensor],
    hidden: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The teachers' next-token logits (positions ``0 .. L-2``) and, with ``hidden``, their hidden states
    less the embeddings (every position): ``general_teacher``'s on the ``general`` rows, ``teacher``'s on
    the others; each teacher runs on its own rows only, and only when it has some."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    general = batch.get("general") if general_teacher is not None else None
    if general is None:
        general = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    extra = {"output_hidden_states": True} if hidden else {}
    logits, states = None, []
    for who, rows in ((teacher, ~general), (general_teacher, general)):
        if not rows.any():
            continue
        if rows.all():
            out = who(input_ids=ids, attention_mask=mask, **extra)
            return out.logits[:, :-1], (list(out.hidden_states[1:]) if hidden else None)
        out = who(input_ids=ids[rows], attention_mask=mask[rows], **extra)
        part = [out.logits, *(out.hidden_states[1:] if hidden else ())]
        if logits is None:
            logits, *states = (x.new_empty((len(ids), *x.shape[1:])) for x in part)
        for dst, src in zip([logits, *states], part, strict=True):
            dst[rows] = src
    return logits[:, :-1], (states if hidden else None)


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

"""A small, honest training loop: AdamW over the trainable parameters only, gradient accumulation,
loss averaged over completion tokens across the accumulated micro-batches."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from neurontune.tasks import IGNORE_INDEX


def train_steps(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    grad_accum: int = 1,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Run ``steps`` optimizer steps; returns one log row per step (loss, seconds)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = params[0].device
    model.train()
    log = []
    for step in tqdm(range(steps), desc="train", disable=not progress):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(grad_accum)]
        # normalise by the completion tokens of the whole accumulated batch, not per micro-batch
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        total = 0.0
        for b in micro:
            b = {k: v.to(device) for k, v in b.items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss_sum = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                b["labels"][:, 1:].flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            (loss_sum / n_tokens).backward()
            total += loss_sum.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "loss": total / n_tokens, "seconds": time.perf_counter() - t0})
    model.eval()
    return log

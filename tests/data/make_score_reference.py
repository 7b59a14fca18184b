"""Write ``score_reference.json``: every built-in scorer's scores on tiny models with fixed seeds.

Run once with the scoring code of commit 5652f7a (before the memory-bounded scorers of issue #29);
``tests/test_scoring_memory.py`` checks today's scores against it. Rerun only to re-baseline on purpose:

    .venv/bin/python tests/data/make_score_reference.py

It runs ATen's AVX2 kernels, as the tests do (``tests/conftest.py``): AVX512 ones round reductions otherwise.
"""

import json
import os
from pathlib import Path

import torch

from neurontune.models import tiny_model
from neurontune.scoring import score_model

CASES = {  # name: (scorer, options)
    "magnitude": ("magnitude", {}),
    "random": ("random", {}),
    "taylor": ("taylor", {}),
    "fisher": ("fisher", {}),
    "fisher-per-sample": ("fisher", {"per_sample": True}),
    "wanda": ("wanda", {}),
    "activation": ("activation", {}),
    "activation-frequency": ("activation", {"mode": "frequency"}),
    "zo-taylor": ("zo-taylor", {"samples": 2}),
    "neft": ("neft", {"probe_steps": 3, "probe_lr": 1e-3}),
    "neft-all": ("neft", {"probe_steps": 2, "probe_lr": 1e-3, "probe_params": "all"}),
}


def batches(model, n=3, batch=2, seq=9):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(0, model.config.vocab_size - 3, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def reference() -> dict:
    torch.set_num_threads(1)
    out = {}
    for kind in ("tiny-llama", "tiny-gpt2"):
        for case, (name, options) in CASES.items():
            model = tiny_model(kind, seed=3)
            scores = score_model(model, name, batches=batches(model), seed=5, **options)
            out[f"{kind}/{case}"] = {n: s.tolist() for n, s in scores.items()}
    for case in ("taylor", "fisher", "wanda"):  # a bf16 base: gradients and statistics from bf16 kernels
        model = tiny_model("tiny-llama", seed=3, dtype=torch.bfloat16)
        scores = score_model(model, case, batches=batches(model), seed=5)
        out[f"tiny-llama-bf16/{case}"] = {n: s.tolist() for n, s in scores.items()}
    return out


if __name__ == "__main__":
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")  # read at the first kernel, after these imports
    path = Path(__file__).with_name("score_reference.json")
    path.write_text(json.dumps(reference(), indent=0) + "\n")
    print(f"wrote {path}")

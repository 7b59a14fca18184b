"""Write ``legacy_row_adapter/``: a row adapter in the format neurontune wrote before its PEFT method
(``neurontune_adapter.json`` + ``neurontune_adapter.safetensors``, ``<module>.delta/.rows/.cols``).

Written once by ``RowTuneModel.save_pretrained``, the writer ``finetune`` used up to commit b2c6072;
``tests/test_peft_method.py`` checks that it still loads and converts exactly. Rerun only on purpose:

    .venv/bin/python tests/data/make_legacy_adapter.py
"""

from pathlib import Path

import torch

from neurontune import NeuronSpec, get_rowtune_model
from neurontune.models import tiny_model

OUT = Path(__file__).parent / "legacy_row_adapter"


def main() -> None:
    model = tiny_model("tiny-llama", seed=0)
    spec = NeuronSpec(
        {
            "model.layers.0.self_attn.q_proj": [1, 5, 30],
            "model.layers.0.mlp.up_proj": {"rows": [0, 7, 8, 63], "cols": [2, 3, 31]},
            "model.layers.1.mlp.down_proj": [4, 5, 6, 7],  # a contiguous range
            "model.layers.1.self_attn.v_proj": {"rows": None, "cols": [0, 9], "shape": [16, 32]},  # every row
        },
        {"scorer": "hand-picked", "seed": 0},
    )
    rt = get_rowtune_model(model, spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in rt.rowtune_layers().values():
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * 0.05)
    rt.save_pretrained(OUT, base_model="tiny-llama")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

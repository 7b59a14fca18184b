"""The gates' settings (:class:`GateConfig`), torch-free so the command line checks them before torch is
imported; the gates themselves are in :mod:`neurontune.gates`."""

from __future__ import annotations

from dataclasses import dataclass

from neurontune.errors import NeurontuneError


@dataclass
class GateConfig:
    granularity: str = "structured"  # structured | linear
    target_sparsity: float = 0.3
    lam: float = (
        1000.0  # penalty weight (FineGates used 50; on SmolLM2 that shut 9 % of a 20 % target in 60 steps)
    )
    sigma: float = 0.1  # noise std in training (and the width of P(g > 0) in the mean penalty)
    tau: float = 0.5  # width of the open-probability surrogate in the ranked penalty
    init: float = 1.0  # initial gate value z; 1.0 = exactly open
    penalty: str = "ranked"  # ranked | mean
    lr: float | None = None  # learning rate of the gates (default: the run's); low-rank terms use the run's
    # "constant": the gates keep their rate from the first step while the run's lr_scheduler (and warm-up)
    # schedules the rest (CoFi's masks have an optimizer of their own at a constant rate); None: scheduled too
    lr_scheduler: str | None = None
    prune_heads: bool = False
    low_rank: int = 0
    low_rank_alpha: float | None = None  # scale s = alpha / r (default alpha = 2r, as LoRA)
    target_modules: str | list[str] = "all-linear"  # for low_rank, train_weights and the linear granularity
    # also train the target modules' weights with the gates (at the run's lr), as CoFi and Sheared-LLaMA
    # do: what stays adapts to what is being removed
    train_weights: bool = False
    width_multiple: int = 64  # kept MLP width rounded to a multiple of this (if the width is >= 4x it)
    tolerance: float = 0.02  # share of the structure the export removes that may still be open at the end
    force: bool = False  # export even when more than `tolerance` must be cut open (reported)
    # optimizer steps over which the share of gates the penalty pushes shut ramps linearly from 0 to
    # the target (0: the whole target from the first step); CoFi and Sheared-LLaMA warm their target up
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in ("structured", "linear"):
            raise NeurontuneError(
                f"gate granularity must be 'structured' or 'linear', got {self.granularity!r}"
            )
        if not 0.0 <= self.target_sparsity < 1.0:
            raise NeurontuneError(
                f"target_sparsity (gate_sparsity on the command line) must be in [0, 1), got {self.target_sparsity}"
            )
        if self.penalty not in ("ranked", "mean"):
            raise NeurontuneError(f"gate penalty must be 'ranked' or 'mean', got {self.penalty!r}")
        if not 0.0 < self.init < 1.5:
            raise NeurontuneError(f"gate init must be in (0, 1.5), got {self.init}")
        if self.lr_scheduler not in (None, "constant"):
            raise NeurontuneError(f"gate lr_scheduler must be 'constant' or unset, got {self.lr_scheduler!r}")
        if self.lr is not None and self.lr <= 0:
            raise NeurontuneError(f"gate lr must be positive, got {self.lr}")
        if self.sigma <= 0 or self.tau <= 0 or self.lam < 0 or self.low_rank < 0:
            raise NeurontuneError("gate sigma and tau must be > 0, lambda >= 0 and low_rank >= 0")
        if self.ramp_steps < 0:
            raise NeurontuneError(f"gate ramp_steps must be >= 0, got {self.ramp_steps}")
        if self.width_multiple < 1 or not 0.0 <= self.tolerance <= 1.0:
            raise NeurontuneError("gate width_multiple must be >= 1 and tolerance in [0, 1]")

"""Experiment trackers (``report_to=tensorboard,wandb,trackio,...``) through accelerate's tracker classes.

The main process opens them once per run, stores the resolved config as hyper-parameters, logs every
training step (``train/loss``, ``train/lr``, ``train/grad_norm``, the method's own numbers such as
gate sparsity) and the evaluations (``eval/<metric>`` at the last step, ``eval_before/<metric>`` at
step 0). TensorBoard writes under ``output_dir/logs`` and works offline; the others follow their own
settings (``WANDB_MODE=offline``, ``TRACKIO_DIR``, ...).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from neurontune.errors import NeurontuneError

PROJECT = "neurontune"
# tracker name (accelerate's) -> the package it needs
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "trackio": ("trackio",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "aim": ("aim",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "swanlab": ("swanlab",),
}


def tracker_names(report_to: str) -> list[str]:
    """The trackers in a ``report_to`` value (``none``: no tracker); unknown names are refused."""
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    for n in names:
        if n not in PACKAGES:
            raise NeurontuneError(
                f"report_to: unknown tracker {n!r}; choose from none, {', '.join(PACKAGES)}"
            )
    return list(dict.fromkeys(names))


def check_available(report_to: str) -> None:
    for n in tracker_names(report_to):
        if not any(importlib.util.find_spec(p) for p in PACKAGES[n]):
            raise NeurontuneError(
                f"report_to={n} needs the {PACKAGES[n][0]} package: pip install {PACKAGES[n][0]}"
            )


def _hparam(v: Any) -> Any:
    """A config value as TensorBoard's hparams (and every other tracker) take it."""
    return v if isinstance(v, bool | int | float | str) else str(v)


class Trackers:
    """The run's trackers; ``log`` and ``finish`` do nothing when there are none."""

    def __init__(self, report_to: str, output_dir: str | Path, config: dict[str, Any]) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        check_available(report_to)
        self.trackers = []
        run_name = Path(output_dir).resolve().name
        for name in tracker_names(report_to):
            cls = LOGGER_TYPE_TO_CLASS[name]
            if cls.requires_logging_directory:
                tracker = cls(PROJECT, Path(output_dir) / "logs")
            elif name in ("wandb", "trackio"):
                tracker = cls(PROJECT, name=run_name)
            else:
                tracker = cls(PROJECT)
            tracker.start()
            tracker.store_init_configuration({k: _hparam(v) for k, v in config.items()})
            self.trackers.append(tracker)

    def log(self, values: dict[str, Any], step: int, prefix: str = "") -> None:
        numbers = {
            prefix + k: float(v)
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        for t in self.trackers:
            t.log(numbers, step=step)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

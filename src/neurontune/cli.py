"""The ``neurontune`` command line. Thin: every job lives in :mod:`neurontune.pipeline`, imported only
once the arguments are parsed and checked (a test keeps torch out of ``sys.modules`` until then)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import NoReturn

from neurontune import __version__
from neurontune.config import (
    AnalyzeConfig,
    EvalConfig,
    ExportConfig,
    FinetuneConfig,
    MergeConfig,
    SelectConfig,
    add_dataclass_args,
    config_from_args,
)
from neurontune.errors import NeurontuneError

COMMANDS = {
    "select": SelectConfig,
    "finetune": FinetuneConfig,
    "eval": EvalConfig,
    "merge": MergeConfig,
    "export": ExportConfig,
    "analyze": AnalyzeConfig,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neurontune", description="Neuron-level sparse fine-tuning of LLMs.")
    p.add_argument("--version", action="version", version=f"neurontune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, cls in COMMANDS.items():
        epilog = None
        if cls is FinetuneConfig:
            from neurontune.methods import registry

            epilog = "methods (default lr):\n" + "\n".join(
                f"  {n:<8} {m.help}" + (f" (lr {m.default_lr:g})" if m.trains else "")
                for n, m in registry().items()
            )
        sp = sub.add_parser(
            name, help=cls.__doc__.splitlines()[0], description=cls.__doc__.splitlines()[0], epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        sp.add_argument(
            "--config", dest="config_file", metavar="YAML", help="YAML file of key: value settings"
        )
        add_dataclass_args(sp, cls)
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 scorer=random")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # key=value overrides may come after --flags too (argparse only takes one run of positionals)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    ns.overrides = [*ns.overrides, *extra]
    try:
        cfg = config_from_args(COMMANDS[ns.command], ns, ns.overrides, ns.config_file)
        # torch and transformers are first imported here: --help, --version and every option error
        # above answer without them
        from neurontune import analysis, export, pipeline

        job = {
            "select": pipeline.run_select,
            "finetune": pipeline.finetune,
            "eval": pipeline.run_eval,
            "merge": pipeline.run_merge,
            "export": lambda c: export.export(
                c.adapter, c.to, c.output, c.per_module_rank, c.check, c.model, c.overwrite
            ),
            "analyze": analysis.analyze,
        }[ns.command]
        job(cfg)
        _end_process_group()
    except NeurontuneError as e:
        print(f"neurontune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, not a directory, ...: one line naming the path
        where = f"{e.filename}: " if e.filename else ""
        print(f"neurontune: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurontune: interrupted", file=sys.stderr)
        return 130
    return 0


def _end_process_group() -> None:
    """After a job every process finished (they all passed its last collective): destroy the process
    group, so that nothing is sent in it any more. Not on failure: the others may still be in a
    collective, and the launcher ends them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run(argv: list[str] | None = None) -> NoReturn:
    """The ``neurontune`` command: :func:`main`, then exit with its status.

    One process of several (torchrun, ``accelerate launch``: ``WORLD_SIZE`` > 1) exits as multiprocessing's
    workers do, by ``os._exit`` once its output is flushed, without finalizing the interpreter. Its gloo
    process group outlives ``destroy_process_group`` (DeepSpeed, once imported, holds the world group as a
    default argument), and so do gloo's worker threads: one that destroys a finished collective's work
    after the job (a broadcast, in the core dump of an aborted run) may drop the last reference to a tensor
    whose Python object torch keeps alive with it; it then needs the GIL, a finalizing interpreter ends
    the thread mid-destructor, and the process aborts ("terminate called without an active exception",
    SIGABRT) after its job succeeded: 1 run in 38 of a 2-process finetune on 2 cores, and on CI."""
    code = main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # closed, or a broken pipe: nothing to keep
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()

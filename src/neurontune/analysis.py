"""Neuron analysis: where selected rows sit, how specs overlap, how rows move during training, and
whether a full fine-tune moves the rows a selection picked; plus a self-contained HTML report.

Everything here reads only JSON and safetensors: NeuronSpecs (a spec file, an adapter directory, or
a run directory holding ``neuron_spec.json``), run directories (``train_log.csv``, ``metrics.json``,
``checkpoints/step-N/state.safetensors``) and plain transformers models.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurontune.errors import NeurontuneError
from neurontune.io import atomic_path, read_json, read_safetensors, refuse_existing
from neurontune.selection import overlap
from neurontune.spec import NeuronSpec, load_spec
from neurontune.targets import get_weight
from neurontune.train import list_checkpoints, read_checkpoint

MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- loading ---------------------------------------------------------------------------------------
def _layer_and_type(name: str) -> tuple[int | None, str]:
    layer = next((int(p) for p in name.split(".") if p.isdigit()), None)
    return layer, name.split(".")[-1]


# ---- where the neurons are ---------------------------------------------------------------------------
def neuron_map(spec: NeuronSpec) -> dict[str, Any]:
    """Fraction of rows selected per (layer, module type): ``{"layers", "types", "fraction"[l][t]}``
    (None where the spec has no such module) and the row counts ``rows[l][t]``."""
    cells: dict[tuple[int, str], tuple[int, int]] = {}
    for name, sel in spec.modules.items():
        layer, kind = _layer_and_type(name)
        if layer is None:
            continue
        if sel.shape is None:
            raise NeurontuneError(
                f"{name}: the spec has no module shapes; validate it against the model first"
            )
        k = len(sel.rows) if sel.rows is not None else sel.shape[0]
        got = cells.get((layer, kind), (0, 0))
        cells[(layer, kind)] = (got[0] + k, got[1] + sel.shape[0])
    layers = sorted({lt[0] for lt in cells})
    kinds = sorted(
        {lt[1] for lt in cells}, key=lambda t: (MODULE_ORDER.index(t) if t in MODULE_ORDER else 99, t)
    )
    frac = [[cells[(i, t)][0] / cells[(i, t)][1] if (i, t) in cells else None for t in kinds] for i in layers]
    rows = [[cells[(i, t)][0] if (i, t) in cells else 0 for t in kinds] for i in layers]
    return {"layers": layers, "types": kinds, "fraction": frac, "rows": rows}


def overlap_matrix(specs: Sequence[NeuronSpec]) -> list[list[float]]:
    """Jaccard similarity of the selected (module, row) pairs for every pair of specs."""
    n = len(specs)
    m = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            m[i][j] = m[j][i] = overlap(specs[i], specs[j])["jaccard"]
    return m


# ---- how rows move -------------------------------------------------------------------------------
def row_change(base: torch.Tensor, new: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row: cosine between the base row and the new row, and the norm of the difference."""
    base, new = base.float(), new.float()
    return {
        "cosine": torch.nn.functional.cosine_similarity(base, new, dim=1, eps=1e-12),
        "delta_norm": (new - base).norm(dim=1),
    }


def rows_dynamics(model: nn.Module, run_dir: str | Path) -> list[dict[str, Any]]:
    """Over the checkpoints of a row-sparse run: the mean cosine of the selected rows to the base rows
    and the mean norm of their deltas, per step (overall and per module type). ``model`` is the base."""
    run_dir = Path(run_dir)
    spec = load_spec(run_dir)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise NeurontuneError(f"{run_dir}: no checkpoints to follow (train with save_steps > 0)")
    out = []
    for ck in ckpts:
        tensors = read_checkpoint(ck)  # whole, or FSDP2 shards joined
        per_type: dict[str, list[torch.Tensor]] = {}
        norms: dict[str, list[torch.Tensor]] = {}
        for name, sel in spec.modules.items():
            # a PEFT row model's parameter (finetune since the PEFT method), or RowTuneModel's
            peft_key, own_key = (
                f"param.base_model.model.{name}.rowtune_delta.default",
                f"param.base_model.{name}.delta",
            )
            key = peft_key if peft_key in tensors else own_key
            if key not in tensors:
                raise NeurontuneError(f"{ck}: no delta for {name}; is this the run that made the spec?")
            w = get_weight(model.get_submodule(name)).detach()  # (out, in), Conv1D included
            rows = torch.as_tensor(sel.rows) if sel.rows is not None else torch.arange(w.shape[0])
            cols = torch.as_tensor(sel.cols) if sel.cols is not None else torch.arange(w.shape[1])
            base_rows = w[rows].float()
            new_rows = base_rows.clone()
            new_rows[:, cols] += tensors[key].float()
            ch = row_change(base_rows, new_rows)
            kind = _layer_and_type(name)[1]
            per_type.setdefault(kind, []).append(ch["cosine"])
            norms.setdefault(kind, []).append(ch["delta_norm"])
        cos_all = torch.cat([c for cs in per_type.values() for c in cs])
        norm_all = torch.cat([c for cs in norms.values() for c in cs])
        out.append(
            {
                "step": int(ck.name.split("-")[1]),
                "cosine": cos_all.mean().item(),
                "delta_norm": norm_all.mean().item(),
                "cosine_by_type": {k: torch.cat(v).mean().item() for k, v in per_type.items()},
                "delta_norm_by_type": {k: torch.cat(v).mean().item() for k, v in norms.items()},
            }
        )
    return out


def full_ft_recall(base: nn.Module, tuned: nn.Module, spec: NeuronSpec) -> dict[str, Any]:
    """How many of the rows a full fine-tune changed most were in ``spec``: per module, take as many
    of the most-changed rows (lowest cosine to the base row) as the spec selected, and count the
    overlap. Random selection would give ``k / n`` per module; that expectation is reported too."""
    hit = total = 0
    expected = 0.0
    by_type: dict[str, list[int]] = {}
    for name, sel in spec.modules.items():
        wb = get_weight(base.get_submodule(name)).detach()
        wt = get_weight(tuned.get_submodule(name)).detach()
        if wb.shape != wt.shape:
            raise NeurontuneError(f"{name}: shapes differ between the base and the tuned model")
        rows = set(sel.rows) if sel.rows is not None else set(range(wb.shape[0]))
        k = len(rows)
        change = 1 - row_change(wb, wt)["cosine"]
        top = set(torch.topk(change, k).indices.tolist())
        h = len(top & rows)
        hit, total = hit + h, total + k
        expected += k * k / wb.shape[0]
        t = by_type.setdefault(_layer_and_type(name)[1], [0, 0])
        t[0], t[1] = t[0] + h, t[1] + k
    return {
        "recall": hit / total if total else 0.0,
        "random_expectation": expected / total if total else 0.0,
        "by_type": {k: v[0] / v[1] for k, v in by_type.items()},
        "rows": total,
    }


def read_train_log(run_dir: str | Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "train_log.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


# ---- figures -------------------------------------------------------------------------------------
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return buf.getvalue()


def plot_neuron_map(nmap: dict[str, Any], title: str) -> bytes:
    plt = _figure()
    data = [[math.nan if v is None else v for v in row] for row in nmap["fraction"]]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(nmap["types"]), 1.5 + 0.22 * len(nmap["layers"])))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(nmap["types"])), nmap["types"], rotation=45, ha="right")
    ax.set_yticks(range(len(nmap["layers"])), [str(x) for x in nmap["layers"]])
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of rows selected")
    return _png(fig)


def plot_scores(scores: dict[str, torch.Tensor], title: str, spec: NeuronSpec | None = None) -> bytes:
    """Histogram of per-row scores, pooled per module type (log scale on x when all are positive); with
    ``spec``, the selected rows' scores filled in and each type's lowest selected score dashed (the cut-off)."""
    plt = _figure()
    by_type: dict[str, list[torch.Tensor]] = {}
    chosen: dict[str, list[torch.Tensor]] = {}
    for name, s in scores.items():
        kind = _layer_and_type(name)[1]
        by_type.setdefault(kind, []).append(s.float().flatten())
        sel = spec.modules.get(name) if spec is not None else None
        if sel is not None:
            rows = torch.arange(len(s)) if sel.rows is None else torch.as_tensor(sel.rows, dtype=torch.long)
            chosen.setdefault(kind, []).append(s.float().flatten()[rows])
    pooled = {kind: torch.cat(vals) for kind, vals in sorted(by_type.items())}
    pooled = {kind: v[torch.isfinite(v)] for kind, v in pooled.items()}
    log = all(bool((v > 0).all()) for v in pooled.values())  # one axis for every module type
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for kind, v in pooled.items():
        x = v.log10() if log else v
        _, edges, patches = ax.hist(x.numpy(), bins=60, histtype="step", label=kind)
        if kind in chosen:
            c = torch.cat(chosen[kind])
            c = (c.log10() if log else c)[torch.isfinite(c)]
            color = patches[0].get_edgecolor()
            ax.hist(c.numpy(), bins=edges, alpha=0.35, color=color)
            if len(c):
                ax.axvline(float(c.min()), color=color, linestyle="--", linewidth=0.8)
    ax.set_xlabel("log10 score" if log else "score")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_matrix(matrix: list[list[float]], labels: list[str], title: str) -> bytes:
    plt = _figure()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(2.0 + 0.9 * n, 1.5 + 0.8 * n))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{matrix[i][j]:.2f}",
                ha="center",
                va="center",
                color="w" if matrix[i][j] < 0.6 else "k",
            )
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="Jaccard")
    return _png(fig)


def plot_lines(
    series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str
) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="." if len(x) < 30 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if xlabel == "step":  # steps are whole numbers: no 1.5 or 2.5 on the axis
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(series) > 1:
        ax.legend(fontsize=7)
    return _png(fig)


# ---- HTML ----------------------------------------------------------------------------------------
class Report:
    """A self-contained HTML page: sections of text, tables and PNG figures (embedded as data URIs
    and, with ``png_dir``, also written as files)."""

    def __init__(self, title: str, png_dir: str | Path | None = None, replace: bool = True) -> None:
        self.title, self.parts, self.sections = title, [], []
        self.png_dir = Path(png_dir) if png_dir is not None else None
        self.replace = replace  # False: no file it writes replaces an existing one
        self.pngs: list[Path] = []

    def section(self, title: str, text: str = "") -> None:
        self.sections.append(title)
        self.parts.append(f'<h2 id="s{len(self.sections)}">{html.escape(title)}</h2>')
        if text:
            self.parts.append(f"<p>{html.escape(text)}</p>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        def cell(v: Any) -> str:
            return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))

        def td(v: Any) -> str:  # numbers right-aligned, text left-aligned
            return f"<td>{cell(v)}</td>" if isinstance(v, int | float) else f"<td class='text'>{cell(v)}</td>"

        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(td(v) for v in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def kv_table(self, rows: Sequence[tuple[str, Any]], collapsed: str | None = None) -> None:
        """A two-column table of names (as row headers) and values, with no empty header row; with
        ``collapsed``, folded under that summary line."""
        body = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td></tr>"
            for k, v in rows
        )
        table = f"<table class='kv'><tbody>{body}</tbody></table>"
        self.parts.append(
            f"<details><summary>{html.escape(collapsed)}</summary>{table}</details>" if collapsed else table
        )

    def figure(self, png: bytes, name: str, caption: str = "") -> None:
        if self.png_dir is not None:
            self.png_dir.mkdir(parents=True, exist_ok=True)
            path = self.png_dir / f"{name}.png"
            with atomic_path(path, self.replace) as tmp:
                tmp.write_bytes(png)
            self.pngs.append(path)
        data = base64.b64encode(png).decode()
        self.parts.append(
            f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def html(self) -> str:
        toc = "".join(
            f'<li><a href="#s{i + 1}">{html.escape(t)}</a></li>' for i, t in enumerate(self.sections)
        )
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1><ul class='toc'>{toc}</ul>{''.join(self.parts)}</body></html>"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path, self.replace) as tmp:
            tmp.write_text(self.html(), encoding="utf-8")
        return path


_CSS = (
    "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th{background:#f3f3f3}img{max-width:100%}figcaption{font-size:90%;color:#555}"
    "table.kv th{text-align:left;font-weight:normal}table.kv td,td.text{text-align:left;max-width:520px}"
)


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1100, height: int = 3000) -> Path:
    """Render an HTML file to a PNG with headless Chromium (``/usr/bin/chromium``, Debian's package)."""
    import shutil
    import subprocess
    import tempfile

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise NeurontuneError("chromium not found; install Debian's 'chromium' package to render reports")
    png_path = Path(png_path).resolve()
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", "--hide-scrollbars",
            f"--screenshot={png_path}", Path(html_path).resolve().as_uri(),
        ]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0 or not png_path.is_file():
        raise NeurontuneError(f"chromium could not render {html_path}: {res.stderr[-500:]}")
    return png_path


# ---- reports -------------------------------------------------------------------------------------
def _metric_value(m: dict[str, Any], which: str = "after") -> float | None:
    vals = m.get(which) or {}
    return vals.get(m.get("primary_metric", ""))


def _neurons_from(m: dict[str, Any]) -> str:
    if m.get("spec"):
        return f"spec {_run_label(Path(m['spec']))}"
    return m.get("scorer") or "-"


def _run_label(p: Path) -> str:
    return p.parent.name if p.name in ("neuron_spec.json", "adapter", "pruned") else p.name


def _finetune_defaults() -> dict[str, Any]:
    """Every ``neurontune finetune`` option with its default."""
    import dataclasses

    from neurontune.config import FinetuneConfig

    return {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}


def add_run_sections(report: Report, runs: Sequence[Path], model: nn.Module | None) -> None:
    """Loss curves, a results table (the transfer table when runs share a task), and row dynamics."""
    metrics = {r: read_json(r / "metrics.json", "run metrics") for r in runs}
    report.section(
        "Runs",
        "One row per run; 'neurons from' is the scorer that chose the rows, or the spec they were taken from.",
    )
    report.table(
        ["run", "task", "method", "neurons from", "trainable params", "metric", "before", "after", "forgetting ppl"],
        [
            [
                _run_label(r), m["task"], m["method"], _neurons_from(m), f"{m['trainable_params']:,}",
                m["primary_metric"], _metric_value(m, "before") if m.get("before") else "-", _metric_value(m),
                (m.get("after") or {}).get("forgetting_ppl", "-"),
            ]
            for r, m in metrics.items()
        ],
    )  # fmt: skip
    # an option a run's config lacks (made before the option existed) had its default
    defaults = _finetune_defaults()
    configs = {
        r: {**defaults, **read_json(r / "config.json", "run config")}
        for r in runs
        if (r / "config.json").is_file()
    }
    if len(configs) > 1:
        skip = {
            "output_dir",
            "data_fingerprint",
            "model_fingerprint",
            "neurontune_version",
            "overwrite",
            "resume",
        }
        keys = sorted({k for c in configs.values() for k in c} - skip)
        differ = [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1]
        report.section(
            "Settings side by side",
            f"The settings that differ between the runs ({len(keys) - len(differ)} others are the same)."
            if differ else "All runs have the same settings (apart from their output directories).",
        )  # fmt: skip
        if differ:
            report.table(["run", *differ], [[_run_label(r), *[c.get(k, "-") for k in differ]]
                                            for r, c in configs.items()])  # fmt: skip
    logs = {_run_label(r): read_train_log(r) for r in runs}
    series = {k: ([x["step"] for x in v], [x["loss"] for x in v]) for k, v in logs.items() if v}
    if series:
        report.section("Training loss")
        report.figure(
            plot_lines(series, "step", "loss (mean over completion tokens)", "training loss"), "loss"
        )
    dyn = {}
    if model is not None:
        for r in runs:
            if metrics[r]["method"] in ("rows", "neft") and list_checkpoints(r):
                dyn[_run_label(r)] = rows_dynamics(model, r)
    if dyn:
        report.section(
            "Neuron dynamics",
            "Mean over the selected rows of the cosine between the tuned row and the base row, and of the norm of "
            "the row's change, at every checkpoint.",
        )
        report.figure(
            plot_lines({k: ([d["step"] for d in v], [d["cosine"] for d in v]) for k, v in dyn.items()},
                       "step", "mean cosine to base row", "selected rows: cosine to the base"),
            "dynamics_cosine",
        )  # fmt: skip
        report.figure(
            plot_lines({k: ([d["step"] for d in v], [d["delta_norm"] for d in v]) for k, v in dyn.items()},
                       "step", "mean ||row change||", "selected rows: size of the change"),
            "dynamics_norm",
        )  # fmt: skip
        last = {k: v[-1] for k, v in dyn.items()}
        kinds = sorted({t for d in last.values() for t in d["cosine_by_type"]})
        report.table(
            ["run", "step", *[f"cos {t}" for t in kinds]],
            [[k, d["step"], *[d["cosine_by_type"].get(t, "-") for t in kinds]] for k, d in last.items()],
        )


def analyze(cfg: Any) -> Path:
    """`neurontune analyze`: write ``cfg.output``/report.html (+ PNGs) and return its path."""
    from neurontune.models import load_model

    out = Path(cfg.output)
    refuse_existing(out / "report.html", cfg.overwrite)  # and again as each file is written
    report = Report("neurontune neuron analysis", out, replace=cfg.overwrite)
    specs = [load_spec(p) for p in cfg.spec_paths()]
    labels = cfg.spec_labels()
    runs = [Path(r) for r in cfg.run_paths()]
    for r in runs:
        if not (r / "metrics.json").is_file():
            raise NeurontuneError(f"{r}: not a finished neurontune run (no metrics.json)")
    base_name = cfg.model or next(
        (s.provenance.get("base_model") for s in specs if s.provenance.get("base_model")), None
    )
    need_model = (
        cfg.full_ft is not None
        or any(list_checkpoints(r) for r in runs)
        or any(s.modules and next(iter(s.modules.values())).shape is None for s in specs)
    )
    model = load_model(base_name)[0] if need_model else None
    if model is not None:
        specs = [s.validate(model) for s in specs]
    if specs:
        report.section(
            "Where the neurons are", "Fraction of each module's rows selected, per layer and module type."
        )
        summaries = [spec.summary() for spec in specs]
        kinds = sorted({k for s in summaries for k in s["rows_by_type"]})
        report.table(
            ["selection", "rows", "parameters", "modules", *[f"rows in {k}" for k in kinds]],
            [[label, s["rows"], s["params"], s["modules"], *[s["rows_by_type"].get(k, 0) for k in kinds]]
             for label, s in zip(labels, summaries, strict=True)],
        )  # fmt: skip
        for label, spec in zip(labels, specs, strict=True):
            _map_figure(report, spec, f"selected rows: {label}", f"map_{_slug(label)}")
        scored = [
            (label, p, spec)
            for label, p, spec in zip(labels, cfg.spec_paths(), specs, strict=True)
            if _scores_file(p)
        ]
        if scored:
            report.section(
                "Score distributions",
                "Per-row scores the selection ranked, pooled per module type: every row (line) and the "
                "selected rows (filled); the dashed line is each type's lowest selected score.",
            )
            for label, p, spec in scored:
                scores = read_safetensors(_scores_file(p), "scores")
                report.figure(plot_scores(scores, f"scores: {label}", spec), f"scores_{_slug(label)}")
    if len(specs) == 1:
        report.section(
            "Overlap between selections", "One selection given: pass two or more to --specs to compare them."
        )
    if len(specs) > 1:
        m = overlap_matrix(specs)
        report.section(
            "Overlap between selections",
            "Jaccard similarity |A∩B| / |A∪B| of the selected (module, row) pairs.",
        )
        report.figure(plot_matrix(m, labels, "overlap of selected rows"), "overlap")
        report.table(["", *labels], [[a, *row] for a, row in zip(labels, m, strict=True)])
    if cfg.full_ft is not None and specs:
        tuned = load_model(cfg.full_ft)[0]
        report.section(
            "Did full fine-tuning move the selected rows?",
            f"Per module, the k rows that full fine-tuning ({cfg.full_ft}) changed most (lowest cosine to the base "
            "row), with k the number a spec selected there: the fraction that the spec had selected, and what a "
            "random selection of the same size would get on average.",
        )
        rec = [(label, full_ft_recall(model, tuned, s)) for label, s in zip(labels, specs, strict=True)]
        report.table(
            ["spec", "rows", "recall", "random"],
            [[k, r["rows"], r["recall"], r["random_expectation"]] for k, r in rec],
        )
    if runs:
        add_run_sections(report, runs, model)
    path = report.write(out / "report.html")
    print(f"wrote {path} and {len(report.pngs)} figures")
    return path


def _scores_file(spec_path: str) -> Path | None:
    p = Path(spec_path)
    candidates = [p.with_suffix(".scores.safetensors"), p / "neuron_spec.scores.safetensors"]
    return next((c for c in candidates if c.is_file()), None)


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in s)[:40]


def _map_figure(report: Any, spec: NeuronSpec, title: str, name: str) -> None:
    nmap = neuron_map(spec)
    if nmap["layers"]:
        report.figure(plot_neuron_map(nmap, title), name)
    else:  # e.g. only lm_head: nothing sits in a numbered layer
        report.text(
            f"{title}: no selected module belongs to a numbered layer ({', '.join(spec.modules)}), so no map."
        )


def run_report(out: Path, metrics: dict[str, Any], spec: NeuronSpec | None) -> Path:
    """The HTML twin of a finetune run's report.md: results, the run's settings, training curves (loss,
    learning rate, gradient norm, the method's own numbers), (rows) the neuron map, example predictions."""
    from neurontune.evaluation import metric_names

    report = Report(f"neurontune run: {out}", None)
    m = metrics
    before, after = m["before"] or {}, m["after"] or {}
    report.section("Result")
    report.table(
        ["metric", "before", "after"], [[k, before.get(k, "-"), after[k]] for k in metric_names(after)]
    )
    report.text(f"Evaluated on {after.get('eval_examples', '?')} {m['task']} examples "
                f"({after.get('eval_seconds', 0):.1f} s after training).")  # fmt: skip
    report.section("Run")
    report.kv_table([
        ("method", m["method"] + (f" ({m['scorer']})" if m.get("scorer") else "")),
        ("model", m["model"]), ("task", f"{m['task']} ({m['task_kind']})"),
        ("trainable params", f"{m['trainable_params']:,} of {m['total_params']:,}"),
        ("steps", m["steps"]), ("train time", f"{m['train_seconds']:.1f} s"),
        ("tokens / s", f"{m['tokens_per_second']:.0f}" if m.get("tokens_per_second") else "-"),
        ("precision", {"no": "fp32", None: "-"}.get(m.get("precision"), m.get("precision"))),
        ("device", m.get("device", "-")),
        ("peak memory", f"{m['peak_memory_mib']:.0f} MiB ({m['peak_memory_kind']})"),
        ("saved", f"{m['saved']} ({m['saved_bytes']:,} bytes)" if m.get("saved") else "-"),
    ])  # fmt: skip
    cfg_file = out / "config.json"
    cfg = read_json(cfg_file, "run config") if cfg_file.is_file() else {}
    if cfg:
        defaults = _finetune_defaults()
        main = ["lr", "lr_scheduler", "warmup_steps", "steps", "num_train_epochs", "batch_size", "grad_accum", "weight_decay",
                "max_grad_norm", "precision", "max_length", "seed", "budget", "target_modules"]  # fmt: skip
        changed = [k for k in cfg if k in defaults and k not in main and cfg[k] != defaults[k]]
        changed = [k for k in changed if k not in ("output_dir", "overwrite", "resume")]
        report.section("Settings", "The training hyper-parameters, and every option set to something other "
                                   "than its default; the full resolved config (config.json) below.")  # fmt: skip
        report.kv_table([(k, cfg[k]) for k in [*main, *changed] if k in cfg])
        report.kv_table(
            [(k, v) for k, v in cfg.items() if k not in ("data_fingerprint", "model_fingerprint")],
            collapsed="all settings",
        )
    log = read_train_log(out)
    if log:
        report.section("Training")
        steps = [x["step"] for x in log]
        curves = [("loss", "loss (mean over completion tokens)", "training loss"),
                  ("lr", "learning rate", "learning rate"), ("grad_norm", "gradient norm (before clipping)", "gradient norm"),
                  ("gate_sparsity", "fraction of gates shut", "achieved sparsity"), ("penalty", "penalty", "sparsity penalty")]  # fmt: skip
        for key, ylabel, title in curves:
            if key in log[0]:
                report.figure(plot_lines({key: (steps, [x[key] for x in log])}, "step", ylabel, title), key)
    evals = out / "eval_log.json"  # eval_steps: the evaluation curve
    if evals.is_file() and (points := read_json(evals, "evaluation log").get("points")):
        metric = metrics["primary_metric"]
        where = "validation" if cfg.get("eval_split") == "validation" else "evaluation"
        xy = [(p["step"], p[metric]) for p in points if metric in p]
        if xy:
            title = f"{metric} on the {where} examples"
            report.figure(plot_lines({metric: tuple(map(list, zip(*xy, strict=True)))}, "step", metric, title),
                          "eval_curve", f"{title}, during training (eval_steps)")  # fmt: skip
    if spec is not None and all(sel.shape is not None for sel in spec.modules.values()):
        report.section("Neuron map", "Fraction of each module's rows trained, per layer and module type.")
        _map_figure(report, spec, "selected rows", "map")
    samples = after.get("samples", [])
    if samples:
        report.section("Example predictions", f"The first {len(samples)} evaluation examples after training.")
        report.table(["prompt (end)", "prediction", "reference"],
                     [[s["prompt"][-160:], s["prediction"], s["reference"]] for s in samples])  # fmt: skip
    return report.write(out / "report.html")

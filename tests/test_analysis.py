"""Neuron analysis: hand-checkable overlap, neuron map, row change and full-FT recall; dynamics read
back from real checkpoints; every report section; the report rendered by a real browser."""

import os
import shutil

import pytest
import torch

from neurontune.analysis import (
    full_ft_recall,
    load_spec,
    neuron_map,
    overlap_matrix,
    row_change,
    rows_dynamics,
    screenshot,
)
from neurontune.cli import main
from neurontune.models import tiny_model
from neurontune.spec import NeuronSpec, read_adapter

Q, UP = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"


def spec(rows_q, rows_up=(0,)):
    return NeuronSpec(
        {Q: {"rows": list(rows_q), "shape": [32, 32]}, UP: {"rows": list(rows_up), "shape": [64, 32]}}
    )


def test_overlap_matrix_is_jaccard_of_module_row_pairs():
    a, b, c = spec([0, 1, 2]), spec([1, 2, 3]), spec([5], rows_up=[1])
    m = overlap_matrix([a, b, c])
    # a & b share (q,1), (q,2), (up,0) of 5 pairs in the union; a & c share nothing of 6
    assert m[0][1] == m[1][0] == pytest.approx(3 / 5)
    assert m[0][2] == 0.0 and m[0][0] == m[2][2] == 1.0


def test_neuron_map_gives_the_fraction_per_layer_and_type():
    nm = neuron_map(spec([0, 1, 2, 3], rows_up=range(16)))
    assert nm["layers"] == [0, 1] and nm["types"] == ["q_proj", "up_proj"]
    assert nm["fraction"] == [[4 / 32, None], [None, 16 / 64]]
    assert nm["rows"] == [[4, 0], [0, 16]]


def test_row_change_cosine_and_delta_norm():
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    new = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    ch = row_change(base, new)
    torch.testing.assert_close(ch["cosine"], torch.tensor([1.0, 2**-0.5]))
    torch.testing.assert_close(ch["delta_norm"], torch.tensor([1.0, 1.0]))


def test_full_ft_recall_finds_the_rows_that_moved():
    base, tuned = tiny_model("tiny-llama"), tiny_model("tiny-llama")
    with torch.no_grad():
        tuned.get_submodule(Q).weight[[3, 7]] *= -1.0  # the only rows a "full fine-tune" moved
        tuned.get_submodule(UP).weight[[5]] += 1.0
    hit = full_ft_recall(base, tuned, spec([3, 7], rows_up=[5]))
    assert hit["recall"] == 1.0 and hit["rows"] == 3
    assert hit["random_expectation"] == pytest.approx((2 * 2 / 32 + 1 * 1 / 64) / 3)
    miss = full_ft_recall(base, tuned, spec([0, 1], rows_up=[0]))
    assert miss["recall"] == 0.0 and miss["by_type"] == {"q_proj": 0.0, "up_proj": 0.0}


def test_full_ft_recall_reads_gpt2_conv1d_rows_as_rows():
    from neurontune.targets import get_weight

    name = "transformer.h.0.mlp.c_fc"  # Conv1D: weight stored (in, out)
    base, tuned = tiny_model("tiny-gpt2"), tiny_model("tiny-gpt2")
    with torch.no_grad():
        get_weight(tuned.get_submodule(name))[[3, 7]] *= -1.0
    shape = list(get_weight(base.get_submodule(name)).shape)
    assert full_ft_recall(base, tuned, NeuronSpec({name: {"rows": [3, 7], "shape": shape}}))["recall"] == 1.0


def _finetune(out, *extra):
    args = [
        "finetune", "model=tiny-llama", "steps=6", "save_steps=2", "save_total_limit=10", "train_examples=32",
        "eval_examples=8", "forgetting_examples=0", "lr=1e-2", f"output_dir={out}", *extra,
    ]  # fmt: skip
    assert main(args) == 0


def test_dynamics_follow_the_checkpoints_to_the_saved_adapter(tmp_path):
    _finetune(tmp_path / "run")
    model = tiny_model("tiny-llama")
    dyn = rows_dynamics(model, tmp_path / "run")
    assert [d["step"] for d in dyn] == [2, 4, 6]
    assert dyn[0]["cosine"] > dyn[-1]["cosine"] and dyn[0]["delta_norm"] < dyn[-1]["delta_norm"]
    # the last checkpoint holds the saved adapter's deltas: its mean row-change norm, computed directly
    _, deltas = read_adapter(tmp_path / "run" / "adapter")  # the PEFT-format files, in either's terms
    norms = torch.cat([t.norm(dim=1) for k, t in deltas.items() if k.endswith(".delta")])
    assert dyn[-1]["delta_norm"] == pytest.approx(norms.mean().item(), rel=1e-5)


def test_analyze_report_has_every_section_and_transfer_runs(tmp_path, capsys):
    _finetune(tmp_path / "rt")
    _finetune(tmp_path / "rand", "scorer=random")
    _finetune(tmp_path / "imdb-from-rt", "task=imdb", f"spec={tmp_path / 'rt'}", "max_length=64")
    _finetune(tmp_path / "full", "method=full", "save_steps=0")
    assert load_spec(tmp_path / "imdb-from-rt").provenance["transferred_from"] == str(tmp_path / "rt")
    out = tmp_path / "report"
    runs = ",".join(str(tmp_path / r) for r in ("rt", "rand", "imdb-from-rt"))
    rc = main([
        "analyze", f"specs={tmp_path / 'rt'},{tmp_path / 'rand' / 'adapter'}", "labels=magnitude,random",
        f"runs={runs}", f"full_ft={tmp_path / 'full' / 'model'}", "model=tiny-llama", f"output={out}",
    ])  # fmt: skip
    assert rc == 0
    page = (out / "report.html").read_text()
    for title in (
        "Where the neurons are", "Score distributions", "Overlap between selections",
        "Did full fine-tuning move the selected rows?", "Runs", "Training loss", "Neuron dynamics",
    ):  # fmt: skip
        assert f">{title}</h2>" in page, title
    assert "spec rt" in page  # the transfer run names where its neurons came from
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted([
        "map_magnitude.png", "map_random.png", "scores_magnitude.png", "overlap.png", "loss.png",
        "dynamics_cosine.png", "dynamics_norm.png",
    ])  # fmt: skip
    assert all((out / p).stat().st_size > 5000 for p in pngs)
    assert page.count("data:image/png;base64,") == len(pngs)  # self-contained
    assert "{'" not in page  # summaries are tables, not printed Python dicts
    assert ">rows in q_proj</th>" in page
    assert ">Settings side by side</h2>" in page and ">scorer</th>" in page  # magnitude vs random differ
    run_page = (tmp_path / "rt" / "report.html").read_text()
    assert all(f">{t}</h2>" in run_page for t in ("Result", "Training", "Neuron map"))


def test_run_report_sections(tmp_path):
    """Metrics apart from the evaluation's size and time, no empty header row, the settings, the
    learning-rate and gradient-norm curves with whole-number steps, and example predictions."""
    import re

    _finetune(tmp_path / "run", "lr=2e-3")
    page = (tmp_path / "run" / "report.html").read_text()
    for title in ("Result", "Run", "Settings", "Training", "Neuron map", "Example predictions"):
        assert f">{title}</h2>" in page, title
    result = page.split(">Result</h2>")[1].split("</table>")[0]
    assert ">accuracy</td>" in result and "eval_examples" not in result and "eval_seconds" not in result
    assert "<th></th>" not in page
    assert re.search(r"<th>lr</th><td>0\.002</td>", page)
    assert page.count('alt="lr"') == page.count('alt="grad_norm"') == page.count('alt="loss"') == 1
    predictions = page.split(">Example predictions</h2>")[1]
    assert predictions.count("<tr>") == 1 + 5  # header + the first 5 eval examples
    assert ("positive" in predictions) and ("Sentiment:" in predictions)


def test_step_axes_have_whole_number_ticks(monkeypatch):
    from neurontune import analysis

    ticks = []
    monkeypatch.setattr(analysis, "_png", lambda fig: ticks.append(list(fig.axes[0].get_xticks())) or b"")
    analysis.plot_lines({"loss": ([1, 2, 3], [0.3, 0.2, 0.1])}, "step", "loss", "t")
    analysis.plot_lines({"x": ([0.0, 0.5, 1.0], [1, 2, 3])}, "ratio", "y", "t")  # other axes untouched
    assert ticks[0] and all(float(t).is_integer() for t in ticks[0])
    assert not all(float(t).is_integer() for t in ticks[1])


def test_analyze_one_spec_says_why_there_is_no_overlap_and_marks_the_cutoff(tmp_path):
    _finetune(tmp_path / "rt")
    out = tmp_path / "one"
    assert main(["analyze", f"specs={tmp_path / 'rt'}", f"output={out}"]) == 0
    page = (out / "report.html").read_text()
    assert ">Overlap between selections</h2>" in page and "One selection given" in page
    assert "lowest selected score" in page and (out / "scores_rt.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "analyze needs --specs and/or --runs"),
        (["specs=/nope.json"], "/nope.json: not a NeuronSpec file"),
        (["specs=a.json,b.json", "labels=x"], "--labels has 1 names for 2 specs"),
    ],
)
def test_analyze_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    assert main(["analyze", f"output={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neurontune: error: ") and message in err


def test_report_renders_in_headless_chromium(tmp_path):
    if shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs Debian's chromium (.ci/run); it is missing")
        pytest.skip("chromium not installed (apt-get install chromium)")
    import matplotlib.image

    _finetune(tmp_path / "run")
    png = screenshot(tmp_path / "run" / "report.html", tmp_path / "shot.png", width=900, height=1400)
    img = matplotlib.image.imread(png)
    assert img.shape[:2] == (1400, 900)
    assert img[..., :3].std() > 0.05  # text and figures, not a blank page
    # the loss figure is drawn: a band of the page holds many non-white pixels
    assert (img[..., :3].mean(axis=2) < 0.5).mean() > 0.01
    # the analysis page too
    assert (
        main(["analyze", f"specs={tmp_path / 'run'}", f"runs={tmp_path / 'run'}", f"output={tmp_path / 'a'}"])
        == 0
    )
    img = matplotlib.image.imread(screenshot(tmp_path / "a" / "report.html", tmp_path / "a.png", 900, 1400))
    assert img[..., :3].std() > 0.05 and (img[..., :3].mean(axis=2) < 0.5).mean() > 0.01

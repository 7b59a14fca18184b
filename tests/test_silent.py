"""Inputs that used to be accepted and quietly give a wrong result (issue #31, SILENT), and big data
files read as a stream (item 5). Each test failed before its fix."""

from __future__ import annotations

import json

import pytest

import neurontune.data as data_mod
from neurontune.cli import main
from neurontune.data import load_records
from neurontune.errors import NeurontuneError
from neurontune.tasks import load_task
from tests.test_faults import one_error_line


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- duplicates ------------------------------------------------------------------------------------
def test_duplicate_choices_are_refused_with_file_and_line(tmp_path, tokenizer):
    f = write_jsonl(
        tmp_path / "mc.jsonl",
        [{"prompt": "Q?", "choices": ["a", "b"], "answer": 0},
         {"prompt": "Q?", "choices": ["yes", "no", "yes "], "answer": 2}],
    )  # fmt: skip
    with pytest.raises(NeurontuneError, match=r"mc\.jsonl:2: the choice 'yes' is listed twice"):
        load_task(str(f), tokenizer)


def test_duplicate_label_words_are_refused_before_loading(tmp_path, capsys):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    assert main(["finetune", "model=tiny-llama", f"task={f}", "label_words=good,bad,good"]) == 2
    one_error_line(capsys.readouterr().err, "label_words lists 'good' twice")


# ---- newline-safe readers ----------------------------------------------------------------------------
def test_a_quoted_csv_field_keeps_its_newline(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('text,label\n"first line\nsecond line",pos\nplain,neg\n', encoding="utf-8")
    recs = load_records(f)
    assert [r["text"] for _, r in recs] == ["first line\nsecond line", "plain"]
    assert [w for w, _ in recs] == [f"{f}:3", f"{f}:4"]  # the line each record ends on


def test_json_lines_with_raw_unicode_line_separators_are_read(tmp_path):
    f = tmp_path / "d.jsonl"
    texts = ["a\u2028b", "c\u0085d", "e\u2029f"]
    f.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert [r["text"] for _, r in load_records(f)] == texts


def test_a_bad_utf8_line_is_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(NeurontuneError, match=r"d\.jsonl:2: not UTF-8"):
        load_records(f)


# ---- options that did nothing ------------------------------------------------------------------------
def test_an_exclude_that_matches_nothing_is_refused(capsys):
    assert (
        main(
            [
                "finetune",
                "model=tiny-llama",
                "steps=1",
                "exclude_modules=down_prj",
                "output_dir=/nonexistent/x",
            ]
        )
        == 2
    )
    one_error_line(capsys.readouterr().err, "exclude_modules 'down_prj' matches none of the")


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1"])
def test_a_seed_out_of_range_is_one_line(seed, capsys):
    assert main(["finetune", f"seed={seed}"]) == 2
    one_error_line(capsys.readouterr().err, "seed must be between 0 and 4294967295")


# ---- streaming ---------------------------------------------------------------------------------------
def test_a_big_file_is_sampled_parsing_only_the_sample(tmp_path, monkeypatch, capsys):
    f = tmp_path / "big.jsonl"
    n = 30_000
    with f.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) + "\n")
    parsed = []
    real = json.loads
    monkeypatch.setattr(data_mod.json, "loads", lambda s, *a, **k: parsed.append(1) or real(s, *a, **k))
    recs = load_records(f, sample=500, seed=3)
    assert len(recs) == 500 and len(parsed) == 500  # the other 29,500 lines were never parsed
    assert "30,000 records; using a seeded random sample of 500" in capsys.readouterr().out
    lines = [int(w.rsplit(":", 1)[1]) for w, _ in recs]
    assert lines == sorted(lines) and lines[-1] > n // 2  # file order, drawn from the whole file
    assert recs == load_records(f, sample=500, seed=3)  # seeded
    assert recs != load_records(f, sample=500, seed=4)
    small = load_records(f, sample=n)  # a file within the sample is read whole, as before
    assert [w for w, _ in small] == [f"{f}:{i}" for i in range(1, n + 1)]


def test_the_finetune_budget_reads_a_small_file_whole_and_samples_a_big_one():
    from neurontune.config import EvalConfig, FinetuneConfig
    from neurontune.pipeline import MIN_RECORDS_READ, record_budget

    cfg = FinetuneConfig(task="x.jsonl", train_examples=32, eval_examples=8)
    assert record_budget(cfg) == (MIN_RECORDS_READ, None)
    cfg = FinetuneConfig(task="x.jsonl", train_examples=90_000, eval_examples=200, eval_fraction=0.1)
    assert record_budget(cfg) == (200_000, None)  # 2 x 90,000 / 0.9
    cfg = FinetuneConfig(task="x.jsonl", eval_file="y.jsonl", train_examples=20_000, eval_examples=8)
    assert record_budget(cfg) == (40_000, MIN_RECORDS_READ)
    assert record_budget(EvalConfig(task="x.jsonl", eval_examples=5000)) == (100_000, None)  # 2 x 5000 / 0.1


# ---- max_length --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", ["1", "0"])
def test_a_max_length_that_labels_nothing_is_refused(n, capsys):
    assert main(["finetune", "model=tiny-llama", f"max_length={n}"]) == 2
    one_error_line(
        capsys.readouterr().err, "max_length must be at least 2" if n == "1" else "max_length must be"
    )


def test_the_default_max_length_fits_the_data_and_a_cut_is_noted(tmp_path, tokenizer, capsys):
    from neurontune.config import FinetuneConfig
    from neurontune.models import tiny_model
    from neurontune.pipeline import with_max_length
    from neurontune.tasks import Example

    model = tiny_model("tiny-llama")  # positions: 256
    short = [Example("x" * 10, " a"), Example("y" * 40, " b")]
    longest = max(
        len(tokenizer(e.prompt)["input_ids"]) + len(tokenizer(e.completion)["input_ids"]) + 1 for e in short
    )
    cfg = FinetuneConfig(model="tiny-llama")
    assert with_max_length(cfg, short, tokenizer, model).max_length == longest
    assert capsys.readouterr().out == ""  # nothing cut, nothing said
    long = [*short, Example("z" * 600, " c")]
    assert with_max_length(cfg, long, tokenizer, model).max_length == 256  # the model's limit
    assert (
        "note: 1 of 3 examples are longer than max_length=256 tokens (the model's limit"
        in capsys.readouterr().out
    )
    given = with_max_length(FinetuneConfig(model="tiny-llama", max_length=16), long, tokenizer, model)
    assert given.max_length == 16 and cfg.max_length is None  # the config given is left as it was
    assert "2 of 3 examples are longer than max_length=16" in capsys.readouterr().out


def test_finetune_records_the_max_length_and_names_the_eval_file(tmp_path, capsys):
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": f"Q{i}", "completion": f" A{i}"} for i in range(16)]
    )
    test = write_jsonl(
        tmp_path / "held_out.jsonl", [{"prompt": f"Q{i}", "completion": f" A{i}"} for i in range(4)]
    )
    out = tmp_path / "run"
    args = ["finetune", "model=tiny-llama", f"task={train}", f"eval_file={test}", "steps=1", "forgetting_examples=0",
            "eval_before=false", f"output_dir={out}", "scorer=magnitude"]  # fmt: skip
    assert main(args) == 0
    assert "on 4 held_out.jsonl eval examples" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert 2 <= metrics["max_length"] < 16
    assert json.loads((out / "config.json").read_text())["max_length"] is None  # the user's setting
    assert main([*args, "--resume", "steps=2"]) == 2  # (steps changed: refused, but not for max_length)
    assert "max_length" not in capsys.readouterr().err


# ---- merging a PEFT adapter on a tied lm_head --------------------------------------------------------
def test_merging_lora_on_a_tied_lm_head_unties_it_and_matches_the_adapter(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from neurontune.pipeline import load_adapted

    out, merged = tmp_path / "run", tmp_path / "merged"
    assert main(["finetune", "model=tiny-gpt2", "method=lora", "target_modules=c_attn,lm_head", "lr=5e-2",
                 "steps=3", "train_examples=16", "eval_examples=4", "forgetting_examples=0",
                 "eval_before=false", f"output_dir={out}"]) == 0  # fmt: skip
    assert main(["merge", "--adapter", str(out / "adapter"), "--output", str(merged)]) == 0
    said = capsys.readouterr().out
    adapted, _, _ = load_adapted(str(out / "adapter"), dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert plain.config.tie_word_embeddings is False
    ids = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4  # before: 32.4 (the embeddings had moved too)
    assert "lm_head shared its weight with the input embeddings; the merged model unties them" in said


# ---- resume on a changed base model ------------------------------------------------------------------
def test_resume_refuses_a_local_base_whose_weights_changed(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    from neurontune.models import tiny_model, tiny_tokenizer

    base = tmp_path / "base"
    tiny_model("tiny-llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    out = tmp_path / "run"
    args = ["finetune", f"model={base}", "steps=2", "save_steps=1", "train_examples=16", "eval_examples=4",
            "forgetting_examples=0", "eval_before=false", "scorer=magnitude", f"output_dir={out}"]  # fmt: skip
    assert main(args) == 0
    weights = base / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] + torch.randn_like(tensors[name])  # same names, shapes and size
    save_file(tensors, weights, metadata={"format": "pt"})
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    one_error_line(capsys.readouterr().err, f"the base model {base} changed since the run started")

"""Data files in every supported shape, the built-in tasks, batching, and clear errors for bad data."""

import json

import pytest

from neurontune.data import load_records
from neurontune.errors import NeurontuneError
from neurontune.tasks import IGNORE_INDEX, Example, StepBatches, collate, encode, load_task, text_windows

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def chat_tok():
    from neurontune.models import tiny_tokenizer

    t = tiny_tokenizer()  # a fresh one: the session tokenizer stays template-free
    t.chat_template = CHAT_TEMPLATE
    return t


def test_prompt_completion_jsonl(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "completion": f" A{i}"} for i in range(10)])
    task = load_task(str(f), tokenizer, eval_fraction=0.2)
    assert task.kind == "generation" and task.info["format"] == "prompt_completion"
    assert len(task.train) == 8 and len(task.eval) == 2
    assert {e.prompt for e in task.train + task.eval} == {f"Q{i}" for i in range(10)}


def test_multiple_choice_jsonl_by_index_or_text(tmp_path, tokenizer):
    recs = [{"prompt": f"Q{i}?", "choices": ["red", "green", "blue"], "answer": i % 3} for i in range(8)]
    recs += [{"prompt": "Sky?", "choices": ["sea", "blue sky"], "answer": "blue sky"}] * 2
    task = load_task(str(write_jsonl(tmp_path / "mc.jsonl", recs)), tokenizer, eval_fraction=0.2)
    assert task.kind == "multiple_choice" and task.info["format"] == "multiple_choice"
    by_prompt = {e.prompt: e for e in task.train + task.eval}
    assert by_prompt["Q4?"].choices == ("red", "green", "blue") and by_prompt["Q4?"].label == 1
    assert by_prompt["Q4?"].completion == " green"  # trained on the right choice
    assert by_prompt["Sky?"].label == 1 and by_prompt["Sky?"].completion == " blue sky"


def test_alpaca_with_and_without_input(tmp_path, tokenizer):
    f = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Add", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
        ],
    )
    task = load_task(str(f), tokenizer, eval_file=str(f))
    with_input, without = task.train
    assert "### Input:\n2 and 3" in with_input.prompt and with_input.prompt.endswith("### Response:\n")
    assert "### Input" not in without.prompt and without.completion == "hi"


def test_chat_messages_use_the_template_and_train_on_the_last_turn(tmp_path, chat_tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
    ]
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}] * 3)
    task = load_task(str(f), chat_tok, eval_file=str(f))
    ex = task.train[0]
    assert ex.prompt == "<|system|>be brief<|end|>\n<|user|>hello<|end|>\n<|assistant|>"
    assert ex.completion == "hi there<|end|>"


def test_classification_csv_with_verbaliser(tmp_path, tokenizer):
    f = tmp_path / "c.csv"
    f.write_text('text,label\n"good, really",1\nbad,0\nfine,1\nawful,0\n')
    task = load_task(
        str(f), tokenizer, eval_file=str(f), label_words=["neg", "pos"], template="T: {text}\nL:"
    )
    assert task.kind == "classification" and task.label_words == ("neg", "pos")
    assert task.train[0] == Example("T: good, really\nL:", " pos", 1)


def test_classification_string_labels_become_the_words(tmp_path, tokenizer):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"data": [{"text": "x", "label": "spam"}, {"text": "y", "label": "ham"}]}))
    task = load_task(str(f), tokenizer, eval_file=str(f))
    assert task.label_words == ("ham", "spam") and [e.label for e in task.train] == [1, 0]


def test_plain_text_is_language_modelling(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(4)])
    task = load_task(str(f), tokenizer, eval_file=str(f))
    assert task.kind == "text" and task.train[0] == Example("", "line 0")


def test_encode_labels_only_the_completion_and_keeps_the_prompt_end(tokenizer):
    ids, labels = encode(Example("abcdefgh", "XY"), tokenizer, max_length=6)
    # byte-level: 'XY' + EOS = 3 tokens; the prompt keeps its last 3 bytes 'fgh'
    assert tokenizer.decode(ids[:3]) == "fgh" and labels[:3] == [IGNORE_INDEX] * 3
    assert labels[3:] == ids[3:] and ids[-1] == tokenizer.eos_token_id
    batch = collate([encode(Example("a", "b"), tokenizer, 8), (ids, labels)], tokenizer.pad_token_id)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch["labels"][0].tolist() == [
        IGNORE_INDEX,
        *batch["input_ids"][0, 1:3].tolist(),
        *[IGNORE_INDEX] * 3,
    ]


def test_text_windows_cover_every_token_in_order_and_fit_max_length(tokenizer):
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "short"]
    windows = text_windows(texts, tokenizer, max_length=16)
    assert all(w.prompt == "" for w in windows)
    assert "".join(w.completion for w in windows) == "".join(texts)  # nothing lost, nothing repeated
    lengths = [len(encode(w, tokenizer, 10**6)[0]) for w in windows]
    assert lengths[-1] == 6 and set(lengths[:-2]) == {16}  # full windows, then each text's remainder
    assert len(windows) == -(-len(texts[0]) // 15) + 1  # 15 tokens + EOS per window (byte-level)


def test_step_batches_are_a_function_of_the_index(tokenizer):
    examples = [Example(f"p{i}", f" c{i}") for i in range(10)]
    a = StepBatches(examples, tokenizer, batch_size=3, max_length=16, seed=4)
    b = StepBatches(examples, tokenizer, batch_size=3, max_length=16, seed=4)
    assert a.per_epoch == 3  # 10 // 3, the incomplete batch is dropped
    seen = [a[i]["input_ids"] for i in range(3)]
    assert len({tuple(r.tolist()) for s in seen for r in s}) == 9  # no repeats within an epoch
    for i in (5, 0, 7, 2):  # random access in any order gives the same batch as a fresh stream
        assert b[i]["input_ids"].equal(a[i]["input_ids"])
    assert not a[3]["input_ids"].equal(a[0]["input_ids"])  # next epoch, new permutation


@pytest.mark.parametrize(
    "name",
    ["rotten_tomatoes", "imdb", "multiemo", "e2e_nlg", "arithmetic", "hyperbaton", "unit_identification",
     "sports_understanding", "vitaminc", "past_tense", "product_sentiment", "si_conversion", "negation"],
)  # fmt: skip
def test_builtin_tasks(name):
    task = load_task(name)
    assert len(task.train) > 800 and len(task.eval) >= 100
    assert set(task.train[0].prompt) and task.train[0].completion.startswith(" ")
    if task.kind == "classification":
        assert all(e.completion == " " + task.label_words[e.label] for e in task.eval)


# ---- errors ---------------------------------------------------------------------------------------
def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": \n')
    with pytest.raises(NeurontuneError, match=r"bad\.jsonl:3: malformed JSON line"):
        load_records(f)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], r"d\.jsonl:2: missing field 'completion'"),
        ([{"prompt": "a", "completion": ""}], r"d\.jsonl:1: missing or empty field 'completion'"),
        ([{"question": "a", "answer": "b"}], r"unrecognised record with fields \['answer', 'question'\]"),
        ([{"text": "a", "label": 0}, {"text": "b", "label": 1}], "integer labels .* need a verbaliser"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "the last message must be the assistant's"),
        ([{"prompt": ["a"], "completion": "b"}], "field 'prompt' must be a string"),
        (["just a string"], r"d\.jsonl:1: expected a JSON object"),
        (
            [{"prompt": "a", "choices": ["x", "y"], "answer": 2}],
            r"d\.jsonl:1: answer 2 is out of range for 2",
        ),
        ([{"prompt": "a", "choices": ["x", "y"], "answer": "z"}], r"answer 'z' is neither a choice's index"),
        ([{"prompt": "a", "choices": "xy", "answer": 0}], "'choices' must be a list of two or more"),
    ],
)
def test_bad_records(tmp_path, tokenizer, records, message):
    f = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(NeurontuneError, match=message):
        load_task(str(f), tokenizer)


def test_empty_and_unsupported_files(tmp_path, tokenizer):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(NeurontuneError, match="the dataset is empty"):
        load_task(str(tmp_path / "e.jsonl"), tokenizer)
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(NeurontuneError, match="unsupported data file type '.parquet'"):
        load_task(str(tmp_path / "d.parquet"), tokenizer)
    with pytest.raises(NeurontuneError, match="unknown task 'sst2'"):
        load_task("sst2", tokenizer)


def test_label_out_of_range_and_unknown_label(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    with pytest.raises(NeurontuneError, match=r"d\.jsonl:2: label 2 out of range"):
        load_task(str(f), tokenizer, label_words=["neg", "pos"])
    f = write_jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(NeurontuneError, match=r"s\.jsonl:2: label 'meh' is not one of \['neg', 'pos'\]"):
        load_task(str(f), tokenizer, label_words=["neg", "pos"])


def test_a_saved_datasets_directory_with_column_mapping_trains(tmp_path, capsys):
    import json

    from datasets import Dataset, DatasetDict

    from neurontune.cli import main

    rows = [{"question": f"What is {i} plus 1?", "answer": f" {i + 1}"} for i in range(24)]
    DatasetDict(
        {"train": Dataset.from_list(rows[:20]), "validation": Dataset.from_list(rows[20:])}
    ).save_to_disk(tmp_path / "ds")
    out = tmp_path / "run"
    args = ["finetune", "model=tiny-llama", f"task={tmp_path / 'ds'}", "columns=prompt=question,completion=answer",
            "steps=2", "batch_size=4", "forgetting_examples=0", f"output_dir={out}"]  # fmt: skip
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task_kind"] == "generation" and "rougeL" in m["after"]
    assert "4 eval examples" in capsys.readouterr().out  # the validation split, not a random hold-out
    fp = json.loads((out / "config.json").read_text())["data_fingerprint"]
    assert list(fp) == [str(tmp_path / "ds")] and fp[str(tmp_path / "ds")]["bytes"] > 0
    assert main([*args[:3], "columns=prompt=query", *args[4:], f"output_dir={tmp_path / 'r2'}"]) == 2
    assert "no column 'query' to map" in capsys.readouterr().err


def test_class_label_names_become_the_label_words(tmp_path, tokenizer):
    from datasets import ClassLabel, Dataset, Features, Value

    feats = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    Dataset.from_dict({"text": ["bad", "good", "awful", "great"] * 3, "label": [0, 1, 0, 1] * 3},
                      features=feats).save_to_disk(tmp_path / "ds")  # fmt: skip
    task = load_task(str(tmp_path / "ds"), tokenizer)
    assert task.kind == "classification" and task.label_words == ("negative", "positive")


def test_a_hub_dataset_id_fails_at_once_offline(tmp_path, monkeypatch):
    import time

    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(NeurontuneError, match="the Hugging Face Hub is unreachable"):
        load_task("some-org/some-dataset", None)
    assert time.perf_counter() - t0 < 5


def test_split_seed_fixes_the_test_examples_while_the_seed_changes(tokenizer):
    """split_seed: runs of several seeds test on the same examples (paired comparisons); without it
    each seed splits the data its own way, as before."""
    from neurontune.config import FinetuneConfig
    from neurontune.pipeline import task_from_config

    def split(**kw):
        task = task_from_config(FinetuneConfig(task="hyperbaton", **kw), tokenizer)
        return [e.prompt for e in task.eval[:50]], [e.prompt for e in task.train[:50]]

    assert split(seed=1, split_seed=0) == split(seed=2, split_seed=0) == split(seed=0)
    assert split(seed=1)[0] != split(seed=2)[0]
    with pytest.raises(NeurontuneError, match="split_seed must be between"):
        FinetuneConfig(split_seed=-1)

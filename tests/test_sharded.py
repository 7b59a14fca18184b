"""Sharded from the start, in one process: a model built without its weights holds none of them, a
scorer that needs no data reads each weight from the checkpoint and scores exactly as on the loaded
model, and the checkpoint reader reads only the rows asked for."""

import pytest
import torch

from neurontune.errors import NeurontuneError
from neurontune.models import load_model, tiny_model, tiny_tokenizer
from neurontune.scoring import score_model
from neurontune.sharded import CheckpointReader, checkpoint_key, empty_model, module_weights, weight_source


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_model("tiny-llama", seed=3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_an_empty_model_stores_no_weight_and_reads_each_from_the_checkpoint(base_dir):
    loaded, _ = load_model(str(base_dir))
    empty, _ = load_model(str(base_dir), empty=True)
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in loaded.named_parameters()]
    for (name, p), q in zip(empty.named_parameters(), loaded.parameters(), strict=True):
        assert p.shape == q.shape and p.dtype == q.dtype, name
        assert p.untyped_storage().nbytes() <= p.element_size(), name  # one element, whatever the shape
    for (name, b), c in zip(empty.named_buffers(), loaded.buffers(), strict=True):
        assert torch.equal(b, c), name  # rotary tables are real
    read = module_weights(empty)
    assert module_weights(loaded) is None
    w = read("model.layers.1.mlp.down_proj", empty.get_submodule("model.layers.1.mlp.down_proj"))
    assert torch.equal(w, loaded.get_submodule("model.layers.1.mlp.down_proj").weight)


@pytest.mark.parametrize("scorer", ["magnitude", "random"])
def test_scores_read_from_the_checkpoint_equal_the_loaded_models(base_dir, scorer):
    loaded, _ = load_model(str(base_dir))
    empty = empty_model(base_dir, torch.float32)
    ref = score_model(loaded, scorer, seed=1)
    got = score_model(empty, scorer, seed=1, weights=module_weights(empty))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    with pytest.raises(NeurontuneError, match="does not hold its weights"):
        score_model(empty, "taylor", batches=[{}], weights=module_weights(empty))


def test_the_reader_reads_only_the_rows_asked_for(base_dir):
    reader = CheckpointReader(base_dir)
    full = reader.read("model.layers.0.mlp.gate_proj.weight")
    n = reader.bytes_read
    part = reader.read("model.layers.0.mlp.gate_proj.weight", 10, 20)
    assert torch.equal(part, full[10:20])
    assert reader.bytes_read - n == part.numel() * part.element_size()
    with pytest.raises(NeurontuneError, match="no model.safetensors"):
        CheckpointReader(base_dir / "nowhere")


def test_peft_names_map_to_the_checkpoints_and_the_source_follows_the_peft_model(base_dir):
    from peft import LoraConfig, get_peft_model

    assert checkpoint_key("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    empty = empty_model(base_dir, torch.float32)
    peft_model = get_peft_model(empty, LoraConfig(r=2, target_modules=["q_proj"]))
    assert weight_source(peft_model) is weight_source(empty) is not None
    lora_a = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert (
        lora_a.untyped_storage().nbytes() == lora_a.numel() * 4 and lora_a.abs().sum() > 0
    )  # real, initialised


def test_a_tiny_or_quantized_model_cannot_load_empty():
    with pytest.raises(NeurontuneError, match="unquantized model directory"):
        load_model("tiny-llama", empty=True)


def test_a_checkpoint_under_other_names_is_found_before_loading(base_dir, tmp_path):
    """A model directory whose tensors are stored under names the model does not use (an older layout
    that from_pretrained renames) is noticed from the names alone, so the run can load it whole."""
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(base_dir, other)
    tensors = load_file(other / "model.safetensors")
    tensors["renamed.norm.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    same = empty_model(base_dir, torch.float32)
    assert weight_source(same).missing(same) == []
    empty = empty_model(other, torch.float32)
    assert weight_source(empty).missing(empty) == ["model.norm.weight"]


@pytest.mark.parametrize("tied", [True, False])
def test_an_embedding_in_pieces_reads_its_rows_and_computes_as_the_whole(tmp_path, tied):
    """split_embeddings cuts the embedding (and a head, tied or its own) into pieces no larger than a
    decoder layer; each piece reads its rows of the stored tensor, and the model computes the same
    logits and loss as the loaded one."""
    from transformers import AutoModelForCausalLM

    from neurontune.sharded import EmbeddingPiece, PiecewiseEmbedding, PiecewiseHead, split_embeddings

    config = tiny_model("tiny-llama").config
    config.tie_word_embeddings, config.vocab_size = tied, 1000  # the tokenizer's 259 ids and unused rows
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    empty = empty_model(tmp_path, torch.float32)
    block = sum(p.numel() for p in empty.model.layers[0].parameters())
    pieces = split_embeddings(empty, block)
    per = block // config.hidden_size
    assert len(pieces) == (1 if tied else 2) * -(-1000 // per)  # a tied head projects onto the same pieces
    assert all(p.weight.numel() <= block for p in pieces)
    assert isinstance(empty.get_input_embeddings(), PiecewiseEmbedding)
    assert isinstance(empty.get_output_embeddings(), PiecewiseHead)
    assert sum(isinstance(m, EmbeddingPiece) for m in empty.modules()) == len(pieces)
    reader = weight_source(empty)
    assert reader.missing(empty) == []
    reader.fill(empty)
    ids = torch.tensor([[1, 5, 258, 7, 0, 100]])
    a, b = empty(input_ids=ids, labels=ids), loaded(input_ids=ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss)
    stored = loaded.get_input_embeddings().weight
    torch.testing.assert_close(pieces[1].weight, stored[per : 2 * per])  # a piece holds its rows


def test_zero3_partitions_are_filled_from_the_rows_that_span_them(base_dir, monkeypatch):
    """zero3_fill: a process's ZeRO-3 partition is a range of the flattened tensor (padded to equal
    parts); it is filled from the rows spanning that range, and the parts of all processes put
    together are the stored tensor."""
    import torch.distributed as dist

    from neurontune.sharded import zero3_fill

    loaded, _ = load_model(str(base_dir))
    for world in (2, 3):
        parts: dict[str, list[torch.Tensor]] = {}
        for rank in range(world):
            empty = empty_model(base_dir, torch.float32)
            for _, p in empty.named_parameters():  # what DeepSpeed leaves on a partitioned parameter
                size = -(-p.numel() // world)
                p.ds_numel, p.ds_shape, p.ds_process_group = p.numel(), p.shape, None
                p.ds_tensor = torch.full((size,), float("nan"))
                p.ds_tensor.ds_numel = size
            monkeypatch.setattr(dist, "get_rank", lambda group=None, r=rank: r)
            record = zero3_fill(empty)
            assert record["tensors"] == len(list(empty.parameters()))
            for name, p in empty.named_parameters():
                parts.setdefault(name, []).append(p.ds_tensor.clone())
        for name, q in loaded.named_parameters():
            flat = torch.cat(parts[name])
            assert torch.equal(flat[: q.numel()], q.detach().reshape(-1)), name
            assert flat[q.numel() :].isnan().all()  # the padding is left alone


def test_the_zero_stage_of_a_launch(monkeypatch, tmp_path):
    """A sharded load applies under ZeRO-3 only: the stage is read as accelerate launch exports it (its
    variable, or the stage of the DeepSpeed config file it names)."""
    from neurontune.train import launched_zero_stage

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert launched_zero_stage() is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert launched_zero_stage() == 2  # accelerate's default
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert launched_zero_stage() == 3
    conf = tmp_path / "ds.json"
    conf.write_text('{"zero_optimization": {"stage": 2}}')
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(conf))
    assert launched_zero_stage() == 2  # the file's stage wins
    conf.write_text("{not json")
    with pytest.raises(NeurontuneError, match="DeepSpeed config"):
        launched_zero_stage()


def test_zero3_keeps_one_block_live_and_buckets_by_hidden_size_unless_the_config_says(monkeypatch):
    """DeepSpeed's 1e9 live/reuse parameters keep most of a 1B model gathered on every process; under
    ZeRO-3 the reuse defaults to one decoder layer's parameters and the live ones to as many (or two
    of the largest modules, where a config keeps less for reuse), and the buckets to accelerate's "auto" sizes
    from the hidden size (DeepSpeed's own prefetch 50M parameters); a config that sets them keeps its own.
    A sharded ZeRO-3 load cuts the embedding in pieces of the largest module in a layer."""
    from types import SimpleNamespace

    from neurontune.sharded import largest_block, largest_block_module
    from neurontune.train import TrainArgs, _configure_deepspeed

    model = tiny_model("tiny-llama")
    block = largest_block(model)
    assert block == sum(p.numel() for p in model.model.layers[0].parameters())
    mlp = model.model.layers[0].mlp
    assert largest_block_module(model) == mlp.up_proj.weight.numel() < block
    assert largest_block_module(model, {"model.layers.0.mlp.up_proj.weight"}) == mlp.up_proj.weight.numel()
    assert largest_block_module(model, set()) == 0 == largest_block_module(torch.nn.Linear(2, 2))
    proj = largest_block_module(model)
    for stage, given, want in [
        (3, {}, (block, block)),
        (3, {"stage3_max_live_parameters": 7}, (7, block)),
        (3, {"stage3_max_reuse_distance": 0}, (2 * proj, 0)),  # regather each layer, prefetch one module
        # the capacity setting (examples/deepspeed/zero3_capacity.json): regather, no prefetch
        (3, {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}, (proj, 0)),
        (3, {"stage3_max_reuse_distance": 1e9}, (10**9, 1e9)),  # keep what is reused: live follows
        (2, {}, (None, None)),
    ]:
        conf = {"zero_optimization": {"stage": stage, **given}}
        acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=conf)),
                              num_processes=2)  # fmt: skip
        assert _configure_deepspeed(acc, 2, TrainArgs(grad_accum=2), block, hidden=64, module=proj) == stage
        zero = conf["zero_optimization"]
        assert (zero.get("stage3_max_live_parameters"), zero.get("stage3_max_reuse_distance")) == want
        assert conf["train_batch_size"] == 8 and zero["reduce_bucket_size"] == 64 * 64
        prefetch = given.get("stage3_prefetch_bucket_size", int(0.9 * 64 * 64))
        assert zero.get("stage3_prefetch_bucket_size") == (prefetch if stage == 3 else None)
        assert zero.get("stage3_param_persistence_threshold") == (640 if stage == 3 else None)
    conf = {
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 5e7, "reduce_bucket_size": "auto"}
    }
    acc.state.deepspeed_plugin.deepspeed_config = conf
    _configure_deepspeed(acc, 2, TrainArgs(), block, hidden=64)
    assert conf["zero_optimization"]["stage3_prefetch_bucket_size"] == 5e7
    assert conf["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    acc.state.deepspeed_plugin.deepspeed_config = {
        "zero_optimization": {"stage": 3, "stage3_max_reuse_distance": "far"}
    }
    with pytest.raises(NeurontuneError, match="stage3_max_reuse_distance 'far' is not a number"):
        _configure_deepspeed(acc, 2, TrainArgs(), block, hidden=64, module=proj)
    acc.state.deepspeed_plugin.deepspeed_config = {
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": [1]}
    }
    with pytest.raises(NeurontuneError, match=r"stage3_prefetch_bucket_size \[1\] is not a number"):
        _configure_deepspeed(acc, 2, TrainArgs(), block, hidden=64, module=proj)


@pytest.fixture
def one_process_group():
    """A gloo process group of one process, for fully_shard in this process."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group exists already")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("min_num_params", [0, 1500])
def test_size_based_units_keep_a_row_layer_with_its_base_and_compute_as_unsharded(
    one_process_group, min_num_params
):
    """accelerate's SIZE_BASED_WRAP, done by wrap_by_size: a unit per module of over min_num_params
    parameters, bottom-up, but never a PEFT layer's base layer apart from it (the fused row layer reads
    the base weight itself); the sharded model's loss and delta gradients are the unsharded model's."""
    import copy
    from types import SimpleNamespace

    from peft import get_peft_model
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    from neurontune.rowtune import RowTuneConfig
    from neurontune.runtime import fsdp_units
    from neurontune.train import wrap_by_size

    model = get_peft_model(tiny_model("tiny-llama"), RowTuneConfig(init_rows="magnitude", impl="fused"))
    ref = copy.deepcopy(model)
    plugin = SimpleNamespace(auto_wrap_policy=size_based_auto_wrap_policy, min_num_params=min_num_params,
                             reshard_after_forward=True, cpu_offload=None, mixed_precision_policy=None)  # fmt: skip
    made = wrap_by_size(
        model, SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no")
    )
    assert made == bool(min_num_params)  # 0: accelerate ignores the policy, and so does this
    if not made:
        return
    units = fsdp_units(model)
    layer = "base_model.model.model.layers.0"
    assert {n[len(layer) + 1 :] for n in units if n.startswith(layer + ".")} == {
        "self_attn", "self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    }  # fmt: skip  # k/v (512 each) stay in self_attn's unit; no base_layer is a unit of its own
    assert units[layer] == 64  # the two norms are all its own unit holds
    assert units[f"{layer}.mlp.gate_proj"] == 2048 + sum(
        p.numel() for p in model.get_submodule(f"{layer}.mlp.gate_proj").parameters() if p.requires_grad
    )
    x = torch.randint(0, 259, (2, 12))
    losses = [m(input_ids=x, labels=x).loss for m in (model, ref)]
    for loss in losses:
        loss.backward()
    assert torch.allclose(losses[0], losses[1], rtol=1e-6)
    got = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and got
    for n in got:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-7), n


def test_the_size_based_wrap_threshold_is_read_from_the_launch_and_must_be_an_integer(monkeypatch):
    """accelerate exports fsdp_min_num_params as FSDP_MIN_NUM_PARAMS; it sizes the embedding's pieces
    only under SIZE_BASED_WRAP, and a value that is not an integer is one clear error."""
    from neurontune.train import launched_min_num_params

    monkeypatch.setenv("FSDP_MIN_NUM_PARAMS", "1500")
    assert launched_min_num_params() is None  # not an FSDP launch
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    assert launched_min_num_params() is None
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP")
    assert launched_min_num_params() == 1500
    monkeypatch.setenv("FSDP_MIN_NUM_PARAMS", "1e7")
    with pytest.raises(NeurontuneError, match=r"fsdp_min_num_params '1e7' is not an integer"):
        launched_min_num_params()


def test_streamed_weights_write_what_safetensors_and_transformers_read(tmp_path):
    """StreamedWeights writes each file's header first, then bytes as they come (a tensor whole or its
    rows in turn), into files of at most max_shard_bytes with transformers' index; a write of the wrong
    dtype or size, or a missing byte, is one error."""
    import json

    from safetensors.torch import load_file

    from neurontune.io import StreamedWeights

    torch.manual_seed(0)
    tensors = {
        "a.weight": torch.randn(6, 4),
        "b.weight": torch.randn(5, 3).to(torch.bfloat16),
        "c.bias": torch.randn(7),
        "d.count": torch.arange(3, dtype=torch.int64),
    }
    entries = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    # 96 (over the limit: a file of its own), 30 + 28, 24 bytes: three files
    writer = StreamedWeights(tmp_path, entries, max_shard_bytes=80)
    for chunk in (tensors["a.weight"][:2], tensors["a.weight"][2:]):  # rows in turn, as pieces come
        writer.write(chunk)
    for k in ("b.weight", "c.bias", "d.count"):
        writer.write(tensors[k])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 96 + 30 + 28 + 24
    assert index["weight_map"] == {
        "a.weight": "model-00001-of-00003.safetensors",
        "b.weight": "model-00002-of-00003.safetensors",
        "c.bias": "model-00002-of-00003.safetensors",
        "d.count": "model-00003-of-00003.safetensors",
    }
    read = {}
    for f in sorted(tmp_path.glob("model-*.safetensors")):
        read.update(load_file(f))
    assert read.keys() == tensors.keys()
    for k, t in tensors.items():
        assert read[k].dtype == t.dtype and torch.equal(read[k], t), k

    (tmp_path / "one").mkdir()
    one = StreamedWeights(tmp_path / "one", entries[:1])
    with pytest.raises(NeurontuneError, match="written as torch.float64, announced as torch.float32"):
        one.write(tensors["a.weight"].double())
    with pytest.raises(NeurontuneError, match="fewer bytes written"):
        one.write(tensors["a.weight"][:5])
        one.close()
    two = StreamedWeights(tmp_path / "one", entries[:1])
    with pytest.raises(NeurontuneError, match="100 bytes written where 96 were left"):
        two.write(torch.zeros(25))
    two.abandon()


@pytest.mark.parametrize("tied", [True, False])
def test_a_model_saved_a_parameter_at_a_time_loads_as_save_pretrained_wrote_it(tmp_path, tied):
    """save_model_sharded (method=full after a sharded load; here one process, nothing sharded): the
    checkpoint's names and dtype, the embedding and head joined from their pieces, a tied head stored
    once, config, generation config and tokenizer; files of at most max_shard_bytes. from_pretrained
    reads it back equal to the model it was read from."""
    from transformers import AutoModelForCausalLM

    from neurontune.sharded import save_model_sharded, split_embeddings

    config = tiny_model("tiny-llama").config
    config.tie_word_embeddings, config.vocab_size = tied, 1000
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    loaded, tok = load_model(str(tmp_path / "base"))
    empty = empty_model(tmp_path / "base", torch.float32).requires_grad_(True)
    pieces = split_embeddings(empty, sum(p.numel() for p in empty.model.layers[0].parameters()))
    assert pieces and all(p.weight.requires_grad for p in pieces)  # method=full trains them
    weight_source(empty).fill(empty)
    done = save_model_sharded(empty, tmp_path / "out", tok, write=True, max_shard_bytes=40_000)
    piece = max(p.weight.numel() for p in pieces) * 4
    assert done["largest_gathered_bytes"] == piece  # a piece, never the whole embedding
    files = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert "model.safetensors.index.json" in files and "config.json" in files and "tokenizer.json" in files
    assert not list(tmp_path.glob(".out.*"))  # the temporary directory was renamed into place
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.tie_word_embeddings == tied
    ref = dict(loaded.named_parameters())
    assert dict(back.named_parameters()).keys() == ref.keys()
    for n, p in back.named_parameters():
        assert torch.equal(p, ref[n]), n
    with pytest.raises(NeurontuneError, match="not a model built without its weights"):
        save_model_sharded(loaded, tmp_path / "again", tok, write=True)

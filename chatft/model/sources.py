"""What a model path given on the command line holds, read from its files alone (nothing is loaded).

A path is a model directory (config.json, safetensors weights, tokenizer files), a LoRA/Q-LoRA adapter
directory (adapter_config.json, as finetune.py writes), a .gguf file, or a hub id whose files are in the
local hub cache. `model_source_problems` says in one line each what is wrong with one, so every entry point
refuses a bad path before any model loads (`require_model_source` raises them). Importing this module imports no ML
library.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
from urllib.parse import urlparse

from chatft.errors import ModelPathError
from chatft.model.gguf_header import GGUFHeaderError, gguf_metadata

CONFIG_FILE, ADAPTER_CONFIG_FILE = "config.json", "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def is_adapter_dir(path: str) -> bool:
    """Whether `path` is a LoRA/Q-LoRA adapter directory (it has adapter_config.json, as finetune.py writes)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG_FILE))


def adapter_dir_problem(path: str, flag: str) -> str | None:
    """Why `path` (given as `flag`) is not an adapter directory, or None when it is one."""
    if is_adapter_dir(path):
        return None
    return (f"{flag} {path}: no {ADAPTER_CONFIG_FILE} there; it must be the output directory of a LoRA or Q-LoRA run "
            "of finetune.py.")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def saved_quantization(model_path: str, cache_dir: str | None = None) -> dict | None:
    """The quantization_config a model was saved with (e.g. {"quant_method": "gptq", "bits": 4, ...}), from its
    config.json: a directory's, or a hub id's (from the local hub cache in `cache_dir`, else downloaded). None for a
    full-precision model, and for a .gguf file (de-quantised on load)."""
    if model_path.endswith(".gguf"):
        return None
    config_file = _config_file(model_path, cache_dir)
    quantization = read_json(config_file).get("quantization_config") if config_file else None
    return quantization if isinstance(quantization, dict) else None


def _config_file(model_path: str, cache_dir: str | None) -> str | None:
    """A model's config.json on disk: in its directory, or a hub id's in the local hub cache (downloaded there when
    the hub can be reached); None when there is none."""
    directory = os.path.expanduser(model_path)
    if os.path.isdir(directory) or not _could_be_hub_id(model_path):
        config_file = os.path.join(directory, CONFIG_FILE)
        return config_file if os.path.isfile(config_file) else None
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(model_path, CONFIG_FILE, cache_dir=cache_dir)
    if isinstance(cached, str):
        return cached
    return huggingface_hub.hf_hub_download(model_path, CONFIG_FILE, cache_dir=cache_dir) if _hub_reachable() else None


def trained_with_qlora(output_dir: str) -> bool:
    """Whether the run saved in output_dir trained with --q_lora (from the finetune_args.json it wrote)."""
    args_file = os.path.join(output_dir, "finetune_args.json")
    return os.path.isfile(args_file) and bool(read_json(args_file).get("lora", {}).get("q_lora"))


def adapter_base(adapter_dir: str) -> str | None:
    """The base model an adapter records (base_model_name_or_path in adapter_config.json)."""
    return read_json(os.path.join(adapter_dir, ADAPTER_CONFIG_FILE)).get("base_model_name_or_path")


def checkpoint_kind(path: str) -> str:
    """"lora", "qlora" (an adapter trained on a 4-bit NF4 base), "gptq", "gguf" (a .gguf file) or "full" (a full or
    merged model)."""
    if path.endswith(".gguf"):
        return "gguf"
    if is_adapter_dir(path):
        return "qlora" if trained_with_qlora(path) else "lora"
    return "gptq" if (saved_quantization(path) or {}).get("quant_method") == "gptq" else "full"


def _could_be_hub_id(name: str) -> bool:
    """`name` or `namespace/name`, as the hub spells repository ids (a path like ./x or a/b/c is not one)."""
    return re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", name) is not None and not name.endswith((".gguf", ".json"))


def _hub_reachable() -> bool:
    """False when the hub is switched off (HF_HUB_OFFLINE) or its host does not even resolve (no network)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def hub_id_problems(name: str, flag: str, cache_dir: str | None = None) -> list[str]:
    """A hub id that is not a local path: fine if its config is in the local hub cache, or the hub can be
    reached (transformers downloads it); otherwise say where to get it."""
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(name, CONFIG_FILE, cache_dir=cache_dir)
    if isinstance(cached, str) or _hub_reachable():
        return []
    cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
    return [f"{flag} {name}: no such directory here, and the hub model {name} is not in the local hub cache "
            f"({cache}) and the hub cannot be reached. Download it where there is a connection (`hf download "
            f"{name}`) and copy that cache here, or pass the model's local directory."]


def _weights_problem(directory: str, flag: str, what: str, weights: str) -> str | None:
    if glob.glob(os.path.join(directory, weights)):
        return None
    pickled = sorted({os.path.basename(p) for pattern in PICKLED_WEIGHTS for p in glob.glob(os.path.join(directory, pattern))})
    if pickled:
        return (f"{flag} {directory}: its {what} weights are only in pickle files ({', '.join(pickled[:3])}); chatft "
                "loads safetensors only (unpickling can run code). Convert them once with transformers' "
                "save_pretrained (safe_serialization is its default) in an environment you trust.")
    return f"{flag} {directory}: no {what} weights ({weights}) in it"


def model_source_problems(path: str, flag: str, allow_adapter: bool = False, trust_remote_code: bool = False,
                          cache_dir: str | None = None) -> list[str]:
    """Everything wrong with `path` as a model (or, with allow_adapter, a LoRA adapter) to load: one line each,
    naming `flag` and the path. An empty list means loading can be attempted."""
    if not path:
        return [f"{flag} is required"]
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded):
        if _could_be_hub_id(path):
            return hub_id_problems(path, flag, cache_dir)
        return [f"{flag} {path}: no such file or directory"]
    if os.path.isfile(expanded):
        if not expanded.endswith(".gguf"):
            return [f"{flag} {path}: is a file; expected a model directory or a .gguf file"]
        problem = gguf_header_problem(expanded)
        return [f"{flag} {path}: {problem}"] if problem else []
    if is_adapter_dir(expanded):
        if not allow_adapter:
            return [f"{flag} {path}: is a LoRA adapter directory, not a model. Continue training it with "
                    f"--lora_weight_path {path} (and its base as {flag}), or merge it first with merge_lora.py."]
        try:
            read_json(os.path.join(expanded, ADAPTER_CONFIG_FILE))
        except (ValueError, OSError) as error:
            return [f"{flag} {path}: {ADAPTER_CONFIG_FILE} is not valid JSON ({error})"]
        problems = [_weights_problem(expanded, flag, "adapter", "adapter_model.safetensors")]
    elif not os.path.isfile(os.path.join(expanded, CONFIG_FILE)):
        return [_not_a_model_dir(expanded, path, flag)]
    else:
        problems = _model_dir_problems(expanded, path, flag, trust_remote_code)
    if not any(os.path.isfile(os.path.join(expanded, name)) for name in TOKENIZER_FILES):
        problems.append(f"{flag} {path}: no tokenizer files (tokenizer.json or tokenizer_config.json) in it")
    return [problem for problem in problems if problem]


def gguf_header_problem(path: str) -> str | None:
    """What keeps `path` from being a GGUF file a model can be read from, or None: the GGUF magic, a version 2 or 3
    header read to its end, and a general.architecture string in its metadata (both llama.cpp and transformers need
    it to know what model the file holds). A truncated file says so, not a library's traceback."""
    try:
        metadata = gguf_metadata(path)
    except GGUFHeaderError as error:
        return str(error)
    if "general.architecture" not in metadata:
        return "no general.architecture in its metadata, so no model can be read from it: export or download it again"
    if not isinstance(metadata["general.architecture"], str):
        return "its general.architecture is not a string"
    return None


def require_model_source(path: str, flag: str, hint: str = "", **options) -> None:
    """Raise ModelPathError listing every `model_source_problems(path, flag, **options)`, then `hint`; return when
    loading `path` can be attempted."""
    problems = model_source_problems(path, flag, **options)
    if problems:
        raise ModelPathError("\n".join(problems) + hint)


def _not_a_model_dir(directory: str, path: str, flag: str) -> str:
    hint = ""
    checkpoints = sorted(glob.glob(os.path.join(directory, "checkpoint-*")))
    gguf_files = sorted(glob.glob(os.path.join(directory, "*.gguf")))
    if checkpoints:
        hint = f" It holds training checkpoints: pass one of them, e.g. {checkpoints[-1]}."
    elif gguf_files:
        hint = f" It holds GGUF files: pass one of them, e.g. {gguf_files[0]}."
    return f"{flag} {path}: not a model directory (no {CONFIG_FILE}).{hint}"


def _model_dir_problems(directory: str, path: str, flag: str, trust_remote_code: bool) -> list[str | None]:
    config_file = os.path.join(directory, CONFIG_FILE)
    try:
        config = read_json(config_file)
    except (ValueError, OSError) as error:
        return [f"{flag} {path}: {CONFIG_FILE} is not valid JSON ({error})"]
    problems = [_weights_problem(directory, flag, "model", "*.safetensors")]
    if config.get("auto_map") and not trust_remote_code and not _builtin_model_type(config.get("model_type")):
        problems.append(f"{flag} {path}: the model's code ships with it (auto_map in {CONFIG_FILE}); pass "
                        "--trust_remote_code if you trust its source")
    return problems


def _builtin_model_type(model_type: str | None) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES

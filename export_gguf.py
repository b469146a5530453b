"""Write a fine-tuned model as one GGUF file, for llama.cpp, ollama, LM Studio (and finetune.py, which trains on it).

    $ python export_gguf.py --model_name_or_path output_demo_merged --output_file tessa.gguf
    $ python export_gguf.py --model_name_or_path output_demo --output_file tessa-q4_k_m.gguf --type q4_k_m
    $ llama-cli -m tessa-q4_k_m.gguf -cnv   # chat: the ChatML template the model trained with, stops at <|im_end|>

--model_name_or_path (or --model_path) is a full or merged model directory (finetune.py's or merge_lora.py's output) or
a LoRA/Q-LoRA adapter directory, merged into its base on the fly as merge_lora.py does. Llama (SmolLM2) and Qwen2
models. The file is written beside --output_file (or --output) under a temporary name and renamed when complete; an
existing one is refused unless --overwrite. The file's path is printed alone on stdout.
"""

import sys

from chatft import console
from chatft.checks import ScriptArgumentParser

if __name__ == "__main__":  # before the libraries are imported: they look at what is installed when imported
    console.start()  # a Q-LoRA adapter merges into its full-precision base: neither bitsandbytes nor gptqmodel

from chatft.export.gguf import DEFAULT_TYPE, GGUF_TYPES, export_gguf  # noqa: E402

TYPE_HELP = ("f16 (default): every matrix in float16, as llama.cpp's converter writes by default: a bf16 model's "
             "weights exactly but those under 2^-17 (refused if any exceeds float16's range: use bf16); bf16: "
             "bfloat16, exact for bf16 models; q8_0: 8-bit blocks, about half of f16's size and close to it; q4_k_m: "
             "llama.cpp's 4-bit mix (Q4_K, Q6_K for the output layer and sensitive layers' attn_v and ffn_down), "
             "about a third of f16's size.")


def parse_args(argv=None):
    parser = ScriptArgumentParser("export_gguf.py", __doc__)
    parser.add_argument("--model_name_or_path", "--model_path", required=True, dest="model_name_or_path",
                        metavar="PATH",
                        help="A full or merged model directory, a LoRA/Q-LoRA output directory of finetune.py, or a "
                             ".gguf file (written again in --type).")
    parser.add_argument("--output_file", "--output", required=True, dest="output_file", metavar="FILE",
                        help="The .gguf file to write.")
    parser.add_argument("--type", choices=list(GGUF_TYPES), default=DEFAULT_TYPE, help=TYPE_HELP)
    parser.add_argument("--base_model_path", default=None,
                        help="For an adapter: the full-precision base to merge it into (default: the one recorded in "
                             "adapter_config.json).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output_file.")
    return parser.parse_args(argv)


def export(argv=None) -> None:
    args = parse_args(argv)
    console.print_value(lambda: export_gguf(args.model_name_or_path, args.output_file, args.type, args.base_model_path,
                                            args.overwrite))


def main(argv=None) -> int:
    return console.run_entry_point(export, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Merge a LoRA or Q-LoRA adapter into its base model and save a standalone model.

    $ python merge_lora.py --adapter_path output_qwen --output_dir output_qwen_merged
    $ python merge_lora.py --adapter_path output_qlora --output_dir merged --base_model_path Qwen/Qwen2-7B-Instruct

The output loads with plain `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`
(safetensors shards, tokenizer with the training run's chat template, generation config), chats
with `cli_demo.py -c`, and quantizes with `run_gptq.py`. A non-empty --output_dir is refused unless
--overwrite; it is replaced only once the new model is completely written.
"""

import os
import re
import sys

from chatft import console
from chatft.checks import ScriptArgumentParser, raise_problems
from chatft.model.sources import adapter_dir_problem, model_source_problems

if __name__ == "__main__":  # before the libraries are imported: they look at what is installed when imported
    console.start()  # a Q-LoRA adapter merges into its full-precision base: neither bitsandbytes nor gptqmodel

from chatft.export.merge import DTYPES, merge_adapter  # noqa: E402


def parse_args(argv=None):
    parser = ScriptArgumentParser("merge_lora.py", __doc__)
    parser.add_argument("--adapter_path", required=True, help="A LoRA/Q-LoRA output directory of finetune.py.")
    parser.add_argument("--output_dir", required=True, help="Where the merged model is written.")
    parser.add_argument("--base_model_path", default=None,
                        help="Full-precision base model (default: the one recorded in adapter_config.json). "
                             "Needed for an adapter trained on a GPTQ model.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto",
                        help="dtype of the merged weights (auto: the base model's saved dtype).")
    parser.add_argument("--max_shard_size", default="2048MB", help="Largest safetensors shard, e.g. 2048MB or 5GB.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output_dir.")
    return parser.parse_args(argv)


def flag_problems(args) -> list[str]:
    """Every problem with the flags found from files alone, all at once (the merge checks them again as it goes)."""
    problems = []
    if os.path.isdir(args.adapter_path) and adapter_dir_problem(args.adapter_path, "--adapter_path"):
        problems.append(adapter_dir_problem(args.adapter_path, "--adapter_path"))
    else:
        problems += model_source_problems(args.adapter_path, "--adapter_path", allow_adapter=True)
    if args.base_model_path:
        problems += model_source_problems(args.base_model_path, "--base_model_path")
    # the sizes huggingface_hub's shard splitter reads (it fails only after the merge otherwise)
    size = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]B)\s*", args.max_shard_size, re.IGNORECASE)
    if not size or float(size.group(1)) <= 0:
        problems.append(f"--max_shard_size {args.max_shard_size}: must be a positive size with its unit, e.g. 2048MB "
                        "or 5GB (units: KB, MB, GB, TB).")
    return problems


def merge(argv=None) -> None:
    args = parse_args(argv)
    raise_problems(flag_problems(args))
    merge_adapter(args.adapter_path, args.output_dir, args.base_model_path, args.dtype, args.max_shard_size,
                  args.overwrite)


def main(argv=None) -> int:
    return console.run_entry_point(merge, argv)


if __name__ == "__main__":
    sys.exit(main())

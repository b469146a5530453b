"""Quantize a (merged) fine-tuned model to GPTQ int2/3/4/8 with gptqmodel, calibrated on your data.

    $ python run_gptq.py --model_name_or_path output_qwen_merged --data_path data/identity_demo.json \\
        --output_dir output_qwen_int4 --bits 4

--data_path takes the training data format; its conversations are rendered and tokenized by the
same code as training. A seeded part of the data is held out from calibration and the perplexity of
the assistant replies on it is printed before and after quantization, and written with the settings
to OUTPUT_DIR/quantize_report.json. The output loads with plain `AutoModelForCausalLM.from_pretrained`
(gptqmodel and optimum installed) and `AutoTokenizer.from_pretrained`, chat template included.
Runs on CUDA, or on the CPU (slowly).
"""

import sys

from chatft import console
from chatft.checks import ScriptArgumentParser, out_of_range, raise_problems
from chatft.model.sources import is_adapter_dir, model_source_problems

if __name__ == "__main__":  # before the libraries are imported: they look at what is installed when imported
    console.start(uses=("gptqmodel",))

from chatft.errors import QuantizeError  # noqa: E402
from chatft.export.gptq import GptqSettings, REPORT_FILE, choose_group_size, run_gptq  # noqa: E402

DEFAULTS = GptqSettings()


def parse_args(argv=None):
    parser = ScriptArgumentParser("run_gptq.py", __doc__)
    parser.add_argument("--model_name_or_path", required=True, metavar="PATH",
                        help="Full-precision model, e.g. merge_lora.py's output.")
    parser.add_argument("--data_path", required=True, help="Calibration data, in the training data format.")
    parser.add_argument("--output_dir", "--out_path", required=True, dest="output_dir", metavar="DIR",
                        help="Where the quantized model is written.")
    parser.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=DEFAULTS.bits)
    parser.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=DEFAULTS.group_size,
                        help="Columns sharing one scale; -1: one per row (default: 128, or 64/32 where 128 "
                             "does not divide the model's layer widths).")
    parser.add_argument("--max_len", type=int, default=DEFAULTS.max_len, help="Truncate samples to this many tokens.")
    parser.add_argument("--num_samples", type=int, default=DEFAULTS.num_samples, help="Calibration conversations.")
    parser.add_argument("--batch_size", type=int, default=DEFAULTS.batch_size,
                        help="Calibration conversations a forward pass (padding is left out of the statistics; "
                             "faster on a GPU, slightly different results).")
    parser.add_argument("--num_eval_samples", type=int, default=None,
                        help="Conversations held out for perplexity (default: 10%% of the data, 1 to 64).")
    parser.add_argument("--damp_percent", type=float, default=DEFAULTS.damp_percent)
    parser.add_argument("--desc_act", action="store_true", help="Activation-order quantization (act-order).")
    parser.add_argument("--system_message", default=DEFAULTS.system_message,
                        help="System prompt for conversations without one (use the one training used).")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="Chooses the held-out samples.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output_dir.")
    return parser.parse_args(argv)


def flag_problems(args) -> list[str]:
    """Every problem with the flags found without loading anything, all at once (run_gptq checks the model's files
    and the data again, with what it reads)."""
    problems = [] if is_adapter_dir(args.model_name_or_path) else model_source_problems(args.model_name_or_path,
                                                                                         "--model_name_or_path")
    problems += [
        out_of_range("--max_len", args.max_len, low=1),
        out_of_range("--num_samples", args.num_samples, low=1),
        out_of_range("--num_eval_samples", args.num_eval_samples, low=1) if args.num_eval_samples is not None else None,
        out_of_range("--batch_size", args.batch_size, low=1),
        out_of_range("--damp_percent", args.damp_percent, low=0, high=1, low_inclusive=False, high_inclusive=False),
    ]
    try:  # the group size's own rule (-1 or positive); the layer widths it must divide are read with the model
        choose_group_size(args.group_size, widths=set())
    except QuantizeError as error:
        problems.append(str(error))
    return [problem for problem in problems if problem]


def quantize(argv=None) -> None:
    args = parse_args(argv)
    raise_problems(flag_problems(args))
    settings = GptqSettings(
        bits=args.bits, group_size=args.group_size, damp_percent=args.damp_percent, desc_act=args.desc_act,
        max_len=args.max_len, num_samples=args.num_samples, num_eval_samples=args.num_eval_samples,
        batch_size=args.batch_size, seed=args.seed, system_message=args.system_message,
    )
    report = run_gptq(args.model_name_or_path, args.data_path, args.output_dir, settings, args.overwrite)
    print(f"Perplexity on {report['held_out_samples']} held-out conversations (assistant replies): "
          f"{report['perplexity_before']:.3f} before, {report['perplexity_after']:.3f} after "
          f"{args.bits}-bit GPTQ (x{report['perplexity_ratio']:.3f}). Report: {args.output_dir}/{REPORT_FILE}")


def main(argv=None) -> int:
    return console.run_entry_point(quantize, argv)


if __name__ == "__main__":
    sys.exit(main())

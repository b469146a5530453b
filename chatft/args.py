"""Command-line arguments: Qwen's four dataclasses, plus every `transformers.TrainingArguments` flag.

`parse_args` accepts either flags or a single `.json`/`.yaml` file holding the same keys,
then runs `validate_args`, which collects every cross-field problem and raises once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field

import transformers

from chatft import cache_root
from chatft.data.chat_format import CHAT_FORMATS, DEFAULT_SYSTEM_MESSAGE
from chatft.model.sources import adapter_dir_problem, model_source_problems
from chatft.errors import ArgumentError
from chatft.data.formats import FORMATS
from chatft.model.load import training_setup_problems


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A model directory, a hub id already in the local cache, or a .gguf file (de-quantised once "
                  "and cached). `python -m chatft.bundled` prints the bundled demo model's directory."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run Python code shipped with the model. Off unless you trust its source."}
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "auto: flash_attention_2 when flash-attn is installed and training on CUDA, else sdpa. "
                  "Or any value transformers accepts (sdpa, eager, flash_attention_2, ...)."},
    )
    train_embeddings: str = field(
        default="auto",
        metadata={"help": "auto|true|false. Train the input embeddings and output layer (LoRA: as modules_to_save). "
                  "auto: under LoRA, only when <|im_start|>/<|im_end|> had to be added to the tokenizer; "
                  "full-parameter training trains them unless false."},
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default=None,
        metadata={"help": "Training data: JSON or JSONL files, or directories of them, comma-separated; in the seed's "
                  "conversations, ShareGPT, OpenAI messages or alpaca format (detected per file)."},
    )
    eval_data_path: str = field(
        default=None,
        metadata={"help": "Evaluation data, like --data_path; or a fraction such as 0.05, split off the training data "
                  "with --seed."},
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "auto|conversations|sharegpt|messages|alpaca: the format of every data file (auto: detected "
                  "per file from its records)."},
    )
    lazy_preprocess: bool = field(default=False, metadata={"help": "Tokenize samples when first used, not up front."})
    chat_format: str = field(
        default="auto",
        metadata={"help": "auto|chatml|qwen3: how conversations are rendered for training (and the chat template saved "
                  "with the model). qwen3: Qwen3's own template (think blocks from reasoning traces, no default system "
                  "prompt); chatml: ChatML with --system_message, a turn's reasoning in a <think> block. auto: qwen3 "
                  "when the model's own template renders reasoning as Qwen3's does, else chatml."},
    )
    reasoning_turns: str = field(
        default="all",
        metadata={"help": "all|last (qwen3 format): all: a conversation with reasoning in earlier turns is split into one "
                  "sample per user query, so every reasoning turn is trained in the context it is generated in; "
                  "last: one sample per conversation, training only the turns after its last user query."},
    )
    padding_free: bool = field(
        default=True,
        metadata={"help": "Each batch (per_device_train_batch_size samples, drawn as a padded run draws them) as one "
                  "row with no padding, position_ids restarting per sample and attention inside each sample: the "
                  "padded run's steps, samples and loss, without computing padding. False: pad each batch to its "
                  "longest sample."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Concatenate whole samples into rows of up to model_max_length tokens (first-fit "
                  "decreasing) and batch rows: per_device_train_batch_size then counts rows of several samples, so "
                  "an epoch has fewer, larger optimizer steps (the run says how many samples a step sees). For "
                  "large data and recipes tuned for it."},
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "Load only the tokenizer, check and tokenize the data, print what would be trained on "
                  "(counts, truncation, drops, lengths, padding, one rendered sample) and exit. Writes nothing."},
    )
    preprocessing_num_workers: int = field(
        default=1,
        metadata={"help": "Processes tokenizing the data (1: in this process; the fast tokenizer already uses every "
                  "core for a batch, so more helps mainly on big machines)."},
    )
    preprocessing_cache_dir: str = field(
        default="auto",
        metadata={"help": "Where tokenized data is cached, keyed by data content, tokenizer, template and "
                  "model_max_length, so the next run and the other ranks reuse it. auto: $CHATFT_CACHE/tokenized "
                  "(~/.cache/chatft/tokenized); none: no cache. (--cache_dir is another cache: downloaded hub files.)"},
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "The seed's way, kept for bench.throughput's comparison only: pad every batch to "
                  "model_max_length (most of the compute then goes to padding)."},
    )
    system_message: str = field(
        default=DEFAULT_SYSTEM_MESSAGE,
        metadata={"help": "System prompt for samples without a leading system turn; saved in the chat template."},
    )
    ignore_empty_think: bool = field(
        default=False,
        metadata={"help": "qwen3 format: render the empty <think></think> block Qwen3's template puts before an "
                  "answer without reasoning, but do not train it (ms-swift's ignore_empty_think)."},
    )

    @property
    def eval_fraction(self) -> float | None:
        """--eval_data_path given as a number: the fraction of the training data to evaluate on."""
        try:
            return float(self.eval_data_path) if self.eval_data_path else None
        except ValueError:
            return None

    @property
    def resolved_preprocessing_cache_dir(self) -> str | None:
        """--preprocessing_cache_dir as a directory: auto -> $CHATFT_CACHE/tokenized, none -> None (no cache).
        Where tokenized samples are kept; not --cache_dir (TrainingArguments), where transformers keeps downloaded
        hub files."""
        if self.preprocessing_cache_dir.lower() in ("none", ""):
            return None
        if self.preprocessing_cache_dir == "auto":
            return str(cache_root() / "tokenized")
        return os.path.expanduser(self.preprocessing_cache_dir)


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where downloaded hub files are cached (transformers' and Qwen's flag; tokenized data is "
                  "cached in --preprocessing_cache_dir)."},
    )
    # Qwen's script says adamw_torch; the fused kernel is the same AdamW update in one pass over each tensor, faster
    # on the CPU and on CUDA (transformers' own default since torch 2.8)
    optim: str = field(default="adamw_torch_fused", metadata={
        "help": "Optimizer, as in transformers.TrainingArguments (default: AdamW, its fused kernel; adamw_torch: "
                "the same update, one tensor at a time, as Qwen's script)."})
    model_max_length: int = field(
        default=8192, metadata={"help": "Maximum tokens per sample; longer samples are truncated on the right."}
    )
    labelled_logits_only: bool = field(
        default=True,
        metadata={"help": "Compute the output layer and the loss only at labelled positions, in chunks (the same "
                  "loss and gradients, less memory and compute). False: the model's own loss on full logits."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty output_dir (refused otherwise)."}
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Qwen's flag, kept working: the fraction of steps to warm up over (sets --warmup_steps)."},
    )

    def __post_init__(self):
        if str(self.resume_from_checkpoint).lower() in ("true", "false"):  # True: the latest checkpoint in output_dir
            self.resume_from_checkpoint = str(self.resume_from_checkpoint).lower() == "true" or None
        if self.warmup_ratio is not None:  # transformers 5 folded warmup_ratio into a fractional warmup_steps
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


@dataclass
class LoraArguments:
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all parameters."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt, e.g. q_proj v_proj. Default: every linear projection of the model "
                  "except the output layer."},
    )
    lora_weight_path: str = field(
        default="", metadata={"help": "An adapter directory to continue training from (its LoRA settings win)."}
    )
    lora_bias: str = field(default="none", metadata={"help": "none|all|lora_only: which biases to train."})
    q_lora: bool = field(default=False, metadata={"help": "LoRA on a 4-bit quantized base model."})


# --report_to integrations -> the package each needs, checked before any model is loaded
REPORTING_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                      "clearml": "clearml", "swanlab": "swanlab", "trackio": "trackio"}

ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments, LoraArguments)


class FlagParser(transformers.HfArgumentParser):
    """HfArgumentParser whose parse errors are ArgumentErrors: argparse would print the usage of every
    TrainingArguments flag (hundreds of lines) above the one line that matters."""

    def error(self, message):
        raise ArgumentError(f"{message} (python finetune.py --help lists every flag)")


def parse_args(argv: list[str] | None = None):
    """Parse flags (or one .json/.yaml file) into (model, data, training, lora) arguments and validate them."""
    argv = sys.argv[1:] if argv is None else argv
    parser = FlagParser(ARGUMENT_CLASSES)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            parsed = parser.parse_json_file(os.path.abspath(argv[0]))
        elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            parsed = parser.parse_yaml_file(os.path.abspath(argv[0]))
        else:
            parsed = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments' own checks, e.g. bf16 requested on a device without it
        raise ArgumentError(f"Invalid arguments: {error}") from error
    model_args, data_args, training_args, lora_args = parsed
    validate_args(model_args, data_args, training_args, lora_args)
    return model_args, data_args, training_args, lora_args


def deepspeed_zero_stage(training_args) -> int | None:
    """The ZeRO stage DeepSpeed runs with, or None without DeepSpeed: from --deepspeed (a config path or dict), else
    from accelerate's DeepSpeed plugin (`accelerate launch --use_deepspeed` sets one up without --deepspeed). The one
    place the stage is read: the checks below and chatft.plan.sharding ask here, not transformers' global."""
    config = training_args.deepspeed
    if not config:
        plugin = getattr(training_args, "deepspeed_plugin", None)
        return plugin.zero_stage if plugin is not None else None
    if isinstance(config, str):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    return config.get("zero_optimization", {}).get("stage", 0)


def validate_args(model_args, data_args, training_args, lora_args) -> None:
    """Collect every contradiction between flags; raise `ArgumentError` listing them all."""
    problems = []
    if not data_args.data_path:
        problems.append("--data_path is required: JSON or JSONL files of conversations.")
    if model_args.train_embeddings not in ("auto", "true", "false"):
        problems.append(f"--train_embeddings must be auto, true or false, not {model_args.train_embeddings!r}.")
    if training_args.model_max_length < 8:
        problems.append(f"--model_max_length {training_args.model_max_length} is too small to hold a conversation.")
    if data_args.packing and data_args.lazy_preprocess:
        problems.append("--packing needs every sample's length up front and --lazy_preprocess tokenizes on first use: "
                        "drop one of them.")
    if data_args.chat_format not in CHAT_FORMATS:
        problems.append(f"--chat_format must be one of {', '.join(CHAT_FORMATS)}, not {data_args.chat_format!r}.")
    if data_args.reasoning_turns not in ("all", "last"):
        problems.append(f"--reasoning_turns must be all or last, not {data_args.reasoning_turns!r}.")
    if data_args.data_format not in FORMATS:
        problems.append(f"--data_format must be one of {', '.join(FORMATS)}, not {data_args.data_format!r}.")
    if data_args.eval_fraction is not None and not 0 < data_args.eval_fraction < 1:
        problems.append(f"--eval_data_path {data_args.eval_data_path}: a fraction must be between 0 and 1.")
    if data_args.preprocessing_num_workers < 1:
        problems.append(f"--preprocessing_num_workers must be at least 1, not {data_args.preprocessing_num_workers}.")
    if data_args.preprocessing_num_workers > 1 and data_args.lazy_preprocess:
        problems.append("--preprocessing_num_workers tokenizes everything up front and --lazy_preprocess tokenizes on "
                        "first use: drop one of them.")
    if data_args.packing and data_args.pad_to_max_length:
        problems.append("--pad_to_max_length pads batches of single samples; it cannot be combined with --packing.")
    if data_args.packing and not data_args.padding_free:
        problems.append("--packing batches rows without padding; it cannot be combined with --padding_free False.")
    if lora_args.lora_bias not in ("none", "all", "lora_only"):
        problems.append(f"--lora_bias must be none, all or lora_only, not {lora_args.lora_bias!r}.")
    if not lora_args.use_lora:
        for flag, value in (("--lora_weight_path", lora_args.lora_weight_path), ("--q_lora", lora_args.q_lora)):
            if value:
                problems.append(f"{flag} needs --use_lora.")
    if lora_args.q_lora and deepspeed_zero_stage(training_args) == 3:
        problems.append("--q_lora cannot run under DeepSpeed ZeRO-3 (4-bit weights cannot be partitioned): "
                        "use --deepspeed ds_config_zero2.json (finetune/finetune_qlora_ds.sh's default).")
    if lora_args.q_lora and training_args.fsdp:
        problems.append("--q_lora cannot run under FSDP here: use DeepSpeed ZeRO-2 (finetune/finetune_qlora_ds.sh).")
    not_an_adapter = lora_args.lora_weight_path and adapter_dir_problem(lora_args.lora_weight_path, "--lora_weight_path")
    if not_an_adapter:
        problems.append(not_an_adapter)
    for integration in training_args.report_to or []:
        package = REPORTING_PACKAGES.get(integration)
        if package and importlib.util.find_spec(package) is None:
            problems.append(f"--report_to {integration} needs the {package} package: pip install {package}")
    model_problems = model_source_problems(model_args.model_name_or_path, "--model_name_or_path",
                                           trust_remote_code=model_args.trust_remote_code,
                                           cache_dir=training_args.cache_dir)
    if not model_problems:  # the model's config is readable: check the flags against it
        model_problems = training_setup_problems(model_args, training_args, lora_args)
    problems += model_problems
    if problems:
        raise ArgumentError("\n".join(problems))

"""Command-line arguments: Qwen's four dataclasses, plus every `transformers.TrainingArguments` flag.

`parse_args` accepts either flags or a single `.json`/`.yaml` file holding the same keys,
then runs `validate_args`, which collects every problem (unknown flags, values out of range, files that are
missing or do not parse, flags that exclude each other) and raises once, before any model loads.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers

from chatft import cache_root
from chatft.checks import SEED_RANGE, out_of_range, parse_error, raise_problems, read_json_file, unknown_name_problem
from chatft.data.chat_format import CHAT_FORMATS, DEFAULT_SYSTEM_MESSAGE
from chatft.model.sources import adapter_dir_problem, model_source_problems
from chatft.errors import ArgumentError
from chatft.data.formats import FORMATS
from chatft.model.load import explicit_target_parameters, training_setup_problems
from chatft.model.lora_variants import lora_init_problem, rewrites_base_weights


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
    data_mix: str = field(
        default=None,
        metadata={"help": "How many samples each --data_path source gives, one entry per comma-separated file or "
                  "directory: all (every sample once), N (exactly N: a seeded subset, or the source repeated), or "
                  "Kx (K times its size, e.g. 0.5x, 3x). Default: all of every source."},
    )
    eval_data_mix: str = field(
        default=None, metadata={"help": "--data_mix for the --eval_data_path files."},
    )
    stage: str = field(
        default="sft",
        metadata={"help": "sft: supervised fine-tuning on conversations (the loss on the assistant's replies). pt: "
                  "continued pre-training on raw text (.txt files, a document a line, or {\"text\": ...} records), "
                  "the loss on every token; each document its own sample, or --packing: joined with EOS into "
                  "--model_max_length blocks."},
    )
    chat_format: str = field(
        default="auto",
        metadata={"help": "auto|chatml|qwen3: how conversations are rendered for training (and the chat template saved "
                  "with the model). qwen3: Qwen3's own template (think blocks from reasoning traces, no default system "
                  "prompt); chatml: ChatML with --system_message, a turn's reasoning in a <think> block. auto: qwen3 "
                  "when the model's own template renders reasoning as Qwen3's does, else chatml."},
    )
    reasoning_turns: str = field(
        default="all",
        metadata={"help": "all|last (qwen3 format): all: a multi-turn conversation is split into one sample per user "
                  "query (and per tool step without reasoning), so every reply is trained exactly as Qwen3 generates "
                  "it, think block included (empty without reasoning), in its own prompt; last: one sample per "
                  "conversation, training only the turns after its last user query."},
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
        default=None,
        metadata={"help": "Processes tokenizing the data (default: one per CPU core, up to 16; 1: in this process). "
                  "Data of fewer than two batches (1,024 conversations) is tokenized in this process anyway."},
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
    def num_workers(self) -> int:
        """--preprocessing_num_workers as a count: given, else 1 under --lazy_preprocess (samples are tokenized when
        first used), else every core (up to 16: the batches are rendered in Python, one core each)."""
        if self.preprocessing_num_workers is not None:
            return self.preprocessing_num_workers
        return 1 if self.lazy_preprocess else max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(
            os, "sched_getaffinity") else os.cpu_count() or 1))

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
    eval_generate: int = field(
        default=0,
        metadata={"help": "At each evaluation, answer the first N evaluation conversations (each up to its last "
                  "assistant turn) greedily and append step, prompt, reply and reference to "
                  "output_dir/eval_generations.jsonl; the summary shows the last evaluation's. 0: off."},
    )
    eval_generate_max_new_tokens: int = field(
        default=128, metadata={"help": "--eval_generate: the most tokens a reply may have."}
    )
    pref_beta: float = field(
        default=0.1, metadata={"help": "--stage dpo/simpo/orpo/kto: beta, the preference loss's temperature (ORPO: "
                               "the odds-ratio term's weight)."})
    pref_loss: str = field(default="sigmoid", metadata={"help": "--stage dpo: sigmoid (DPO), ipo or hinge."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "--stage simpo: the target reward margin gamma."})
    pref_ftx: float = field(
        default=None, metadata={"help": "--stage dpo/simpo/kto: weight of an SFT term (the chosen replies' token "
                                "mean cross-entropy) added to the loss; ORPO has its own (weight 1). Default 0."})
    kto_desirable_weight: float = field(default=1.0, metadata={"help": "--stage kto: weight of desirable completions."})
    kto_undesirable_weight: float = field(
        default=1.0, metadata={"help": "--stage kto: weight of undesirable completions."})
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "--stage dpo/kto: before training, one pass of the starting model (no "
                                 "gradients) gives every pair's reference log-probabilities; no reference forward "
                                 "per step and no reference in memory (any mode, ZeRO-3 included)."})
    disable_dropout: bool = field(
        default=True, metadata={"help": "Preference stages: dropout off in the model and its adapters (TRL's "
                                "disable_dropout, same default), so that the policy and its reference compute the "
                                "same function at the start and log-probability ratios are not dropout noise."})
    pref_shared_prompt: bool = field(
        default=True, metadata={"help": "Preference stages: compute each pair's prompt once, the rejected reply "
                                "attending to it as a branch (needs per-sample sdpa); False: prompt + each reply."})
    sequence_parallel_size: int = field(
        default=1, metadata={"help": "Split each row across N processes (DeepSpeed's Ulysses sequence parallelism; "
                             "needs --deepspeed and N dividing the processes). 1: off."}
    )

    def __post_init__(self):
        if str(self.resume_from_checkpoint).lower() in ("true", "false"):  # True: the latest checkpoint in output_dir
            self.resume_from_checkpoint = str(self.resume_from_checkpoint).lower() == "true" or None
        if self.warmup_ratio is not None:  # transformers 5 folded warmup_ratio into a fractional warmup_steps
            self.warmup_steps = self.warmup_ratio
        _defer_or_raise(setup_problems(self), self)
        if self.use_cpu or not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # pinned memory is for copies to an accelerator: torch warns without one
        super().__post_init__()


# transformers' own setup (TrainingArguments.__post_init__) stops at the first of these, naming no flag or file.
# parse_args collects them here, with the setting reset so the setup goes on and validate_args lists every problem;
# TrainingArguments made elsewhere raise them at once.
_DEFERRED_SETUP_PROBLEMS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("setup_problems",
                                                                                           default=None)


def setup_problems(training_args) -> list[tuple[str, dict]]:
    """(problem, the settings that let transformers' setup go on) for --deepspeed and the precision flags."""
    problems = []
    deepspeed = training_args.deepspeed
    if isinstance(deepspeed, str) and deepspeed:
        if deepspeed.lstrip().startswith("{"):  # a config given inline, as transformers accepts
            try:
                config, problem = json.loads(deepspeed), None
            except json.JSONDecodeError as error:
                config, problem = None, (f"--deepspeed: the inline config is not valid JSON (line {error.lineno}, "
                                         f"column {error.colno}: {error.msg}).")
        else:
            config, problem = read_json_file("--deepspeed", deepspeed)
        if problem is None and not isinstance(config, dict):
            problem = (f"--deepspeed {deepspeed}: holds a JSON {type(config).__name__}; a DeepSpeed config is an "
                       "object, e.g. ds_config_zero2.json.")
        if problem:
            problems.append((problem, {"deepspeed": None}))
    for full_eval in ("", "_full_eval"):
        if getattr(training_args, f"bf16{full_eval}") and getattr(training_args, f"fp16{full_eval}"):
            problems.append((f"--bf16{full_eval} and --fp16{full_eval} both ask for 16-bit mixed precision: choose "
                             "one (bf16 where the hardware has it; it needs no loss scaling).",
                             {f"bf16{full_eval}": False, f"fp16{full_eval}": False}))
    if (training_args.bf16 or training_args.bf16_full_eval) and not training_args.use_cpu and not _bf16_device():
        flag = "--bf16" if training_args.bf16 else "--bf16_full_eval"
        problems.append((f"{flag} True needs a GPU with bfloat16 (NVIDIA Ampere or newer) and there is none here: "
                         "add --use_cpu True to train on the CPU in bfloat16, or use --fp16 True on an older GPU.",
                         {"bf16": False, "bf16_full_eval": False}))
    problems += [(problem, {"load_best_model_at_end": False}) for problem in best_model_problems(training_args)]
    return problems


def _strategy(value) -> str:
    return str(getattr(value, "value", value))  # an IntervalStrategy/SaveStrategy or the flag's text


def best_model_problems(training_args) -> list[str]:
    """--load_best_model_at_end loads the checkpoint of the best evaluation, so every evaluation needs its checkpoint:
    the eval and save strategies match (or --save_strategy best), --save_steps a multiple of --eval_steps.
    transformers' own check stops at the first, over three lines."""
    args = training_args
    if not args.load_best_model_at_end or _strategy(args.save_strategy) == "best":
        return []
    evaluation, saving = _strategy(args.eval_strategy), _strategy(args.save_strategy)
    if evaluation == "no":
        return ["--load_best_model_at_end picks the checkpoint of the best evaluation, and --eval_strategy is no: set "
                f"--eval_strategy {saving if saving != 'no' else 'steps'}, as --save_strategy, with evaluation data "
                "(--eval_data_path)."]
    if evaluation != saving:
        return [f"--load_best_model_at_end needs a checkpoint at every evaluation: --eval_strategy {evaluation} and "
                f"--save_strategy {saving} differ; make them the same (or --save_strategy best)."]
    eval_steps = args.eval_steps or args.logging_steps  # transformers' default for --eval_steps
    if evaluation == "steps" and eval_steps >= 1 and args.save_steps >= 1 and args.save_steps % eval_steps:
        return [f"--load_best_model_at_end needs a checkpoint at every evaluation: --save_steps {args.save_steps:g} "
                f"is not a multiple of --eval_steps {eval_steps:g}."]
    return []


def _bf16_device() -> bool:
    """transformers' own test for --bf16 without --use_cpu."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


def _defer_or_raise(problems: list[tuple[str, dict]], training_args) -> None:
    if not problems:
        return
    collected = _DEFERRED_SETUP_PROBLEMS.get()
    if collected is None:
        raise_problems(problem for problem, _ in problems)
    for problem, reset in problems:
        collected.append(problem)
        for name, value in reset.items():
            setattr(training_args, name, value)


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
    lora_target_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "Parameters to adapt through peft's target_parameters, by name or dotted suffix, e.g. "
                  "experts.gate_up_proj experts.down_proj mlp.gate.weight (a mixture-of-experts model's fused experts "
                  "and router); none: no expert adapters. Default: the routed experts' fused weights (every 3-D "
                  "parameter of an `experts` module), router frozen; none with --use_dora, PiSSA or OLoRA."},
    )
    lora_weight_path: str = field(
        default="", metadata={"help": "An adapter directory to continue training from (its LoRA settings win)."}
    )
    lora_bias: str = field(default="none", metadata={"help": "none|all|lora_only: which biases to train."})
    q_lora: bool = field(default=False, metadata={"help": "LoRA on a 4-bit quantized base model."})
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA (peft's use_dora): each adapted weight split into a magnitude and a direction, LoRA "
                  "training the direction. Slower steps; merges like plain LoRA."},
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Rank-stabilized LoRA (peft's use_rslora): scale alpha/sqrt(r) instead of alpha/r, so "
                  "higher ranks keep learning."},
    )
    lora_init: str = field(
        default="default",
        metadata={"help": "How adapters start (peft's init_lora_weights): default (B = 0), gaussian, pissa, "
                  "pissa_niter_N (fast SVD, N iterations), olora. PiSSA and OLoRA start from the base weights' "
                  "principal directions; the saved adapter is converted to a plain LoRA of rank 2r."},
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={"help": "LoRA+: the B matrices train at learning_rate times this (the paper suggests 16); A and "
                  "everything else at learning_rate. Off by default."},
    )


# --report_to integrations -> the package each needs, checked before any model is loaded
REPORTING_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                      "clearml": "clearml", "swanlab": "swanlab", "trackio": "trackio"}

ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments, LoraArguments)
# LoraArguments that only shape the adapter (--lora_weight_path, --q_lora and the variants have their own lines)
ADAPTER_SHAPE_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
                       "lora_bias")


class FlagParser(transformers.HfArgumentParser):
    """HfArgumentParser whose parse errors are ArgumentErrors: argparse would print the usage of every
    TrainingArguments flag (hundreds of lines) above the one line that matters."""

    def error(self, message):
        raise parse_error(message, "finetune.py")


def parse_args(argv: list[str] | None = None):
    """Parse flags (or one .json/.yaml file) into (model, data, training, lora) arguments and validate them."""
    argv = sys.argv[1:] if argv is None else argv
    parser = FlagParser(ARGUMENT_CLASSES)
    problems = []
    token = _DEFERRED_SETUP_PROBLEMS.set(problems)
    try:
        if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
            keys = read_arguments_file(argv[0])
            missing = [name for name in REQUIRED_FLAG_NAMES if name not in keys]
            if missing:  # the dataclass would raise a TypeError naming its __init__
                raise ArgumentError(f"{argv[0]}: {', '.join(missing)} is required (a key of the arguments file).")
            parsed = parser.parse_dict(keys, allow_extra_keys=True)
            problems += [unknown_name_problem(key, FLAG_NAMES, what=f"key in {argv[0]}:") for key in keys
                         if key not in FLAG_NAMES]
        else:
            *parsed, unused = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
            problems += unknown_flag_problems(unused)
    except ValueError as error:  # TrainingArguments' own checks, e.g. --lr_scheduler_type needing an eval strategy
        raise ArgumentError(f"Invalid arguments: {error}") from error
    finally:
        _DEFERRED_SETUP_PROBLEMS.reset(token)
    model_args, data_args, training_args, lora_args = parsed
    validate_args(model_args, data_args, training_args, lora_args, problems)
    return model_args, data_args, training_args, lora_args


# Every key the four argument classes take; a flag is one of them after "--"
FLAG_NAMES = [f.name for group in ARGUMENT_CLASSES for f in dataclasses.fields(group) if f.init]
REQUIRED_FLAG_NAMES = [f.name for group in ARGUMENT_CLASSES for f in dataclasses.fields(group)
                       if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def read_arguments_file(path: str) -> dict:
    """The keys of a .json/.yaml arguments file; a missing file or one that does not parse is an ArgumentError."""
    if not path.endswith(".json"):
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                keys = yaml.safe_load(f)
        except OSError as error:
            raise ArgumentError(f"{path}: the arguments file cannot be read ({error.strerror}).") from None
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            shown = f"line {where.line + 1}, column {where.column + 1}: " if where else ""
            raise ArgumentError(f"{path}: not valid YAML ({shown}{getattr(error, 'problem', None) or error}).") from None
    else:
        keys, problem = read_json_file("arguments file", path)
        if problem:
            raise ArgumentError(problem)
    if not isinstance(keys, dict):
        raise ArgumentError(f"{path}: an arguments file holds flag names and their values (a mapping), not a "
                            f"{type(keys).__name__}.")
    return keys


def unknown_flag_problems(unused: list[str]) -> list[str]:
    """One problem per word of the command line no flag took: an unknown flag (with the closest known one), or a
    value that follows no flag."""
    problems, after_unknown_flag = [], False
    known = ["--" + name for name in FLAG_NAMES]
    for word in unused:
        if word.startswith("-"):
            problems.append(unknown_name_problem(word.split("=", 1)[0], known)
                            + " (python finetune.py --help lists every flag)")
            after_unknown_flag = "=" not in word
        elif after_unknown_flag:  # the unknown flag's value, said with it
            after_unknown_flag = False
        else:
            problems.append(f"{word!r} follows no flag: every value is given as --flag VALUE.")
    return problems


def deepspeed_zero_stage(training_args) -> int | None:
    """The ZeRO stage DeepSpeed runs with, or None without DeepSpeed: from --deepspeed (a config path or dict), else
    from accelerate's DeepSpeed plugin (`accelerate launch --use_deepspeed` sets one up without --deepspeed). The one
    place the stage is read: the checks below and chatft.plan.sharding ask here, not transformers' global."""
    config = deepspeed_config(training_args)
    if not config:
        plugin = getattr(training_args, "deepspeed_plugin", None)
        return plugin.zero_stage if plugin is not None else None
    return config.get("zero_optimization", {}).get("stage", 0)


def deepspeed_config(training_args) -> dict | None:
    """--deepspeed's config as a dict (it is a path or a dict; the file was checked by validate_args), None without."""
    config = training_args.deepspeed
    if isinstance(config, str) and config:
        with open(config, encoding="utf-8") as f:
            return json.load(f)
    return config or None


def validate_args(model_args, data_args, training_args, lora_args, problems: list[str] | None = None) -> None:
    """Collect every problem with the flags (after `problems`, those parsing found); raise `ArgumentError` listing
    them all."""
    problems = list(problems or [])
    if not data_args.data_path:
        problems.append("--data_path is required: JSON or JSONL files of conversations.")
    if model_args.train_embeddings not in ("auto", "true", "false"):
        problems.append(f"--train_embeddings must be auto, true or false, not {model_args.train_embeddings!r}.")
    if training_args.model_max_length < 8:
        problems.append(f"--model_max_length {training_args.model_max_length} is too small to hold a conversation.")
    if data_args.packing and data_args.lazy_preprocess:
        problems.append("--packing needs every sample's length up front and --lazy_preprocess tokenizes on first use: "
                        "drop one of them.")
    problems += stage_problems(data_args, training_args)
    # (under ZeRO-3 the frozen reference is partitioned like the model: chatft.model.load.sharded_reference)
    if (data_args.stage in ("dpo", "kto") and not lora_args.use_lora and not training_args.precompute_ref_log_probs
            and training_args.fsdp):
        problems.append(f"--stage {data_args.stage} full-parameter under FSDP: the frozen reference copy would not be "
                        "sharded; add --precompute_ref_log_probs True (the reference computed once, before training, "
                        "by the model itself), or shard with --deepspeed ds_config_zero3.json (the reference "
                        "partitioned like the model).")
    problems += mix_problems(data_args)
    if data_args.chat_format not in CHAT_FORMATS:
        problems.append(f"--chat_format must be one of {', '.join(CHAT_FORMATS)}, not {data_args.chat_format!r}.")
    if data_args.reasoning_turns not in ("all", "last"):
        problems.append(f"--reasoning_turns must be all or last, not {data_args.reasoning_turns!r}.")
    if data_args.data_format not in FORMATS:
        problems.append(f"--data_format must be one of {', '.join(FORMATS)}, not {data_args.data_format!r}.")
    if data_args.eval_fraction is not None and not 0 < data_args.eval_fraction < 1:
        problems.append(f"--eval_data_path {data_args.eval_data_path}: a fraction must be between 0 and 1.")
    if data_args.preprocessing_num_workers is not None and data_args.preprocessing_num_workers < 1:
        problems.append(f"--preprocessing_num_workers must be at least 1, not {data_args.preprocessing_num_workers}.")
    if (data_args.preprocessing_num_workers or 1) > 1 and data_args.lazy_preprocess:
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
        # without --use_lora the run trains every parameter: an adapter's shape given there was meant for LoRA
        defaults = LoraArguments.__dataclass_fields__
        shape = [f"--{name}" for name in ADAPTER_SHAPE_FLAGS if getattr(lora_args, name) != defaults[name].default]
        if shape:
            problems.append(f"{', '.join(shape)}: the shape of a LoRA adapter, and without --use_lora the run trains "
                            f"every parameter: add --use_lora, or drop {'it' if len(shape) == 1 else 'them'}.")
    if lora_args.q_lora and deepspeed_zero_stage(training_args) == 3:
        problems.append("--q_lora cannot run under DeepSpeed ZeRO-3 (4-bit weights cannot be partitioned): "
                        "use --deepspeed ds_config_zero2.json (finetune/finetune_qlora_ds.sh's default).")
    if lora_args.q_lora and training_args.fsdp:
        problems.append("--q_lora cannot run under FSDP here: use DeepSpeed ZeRO-2 (finetune/finetune_qlora_ds.sh).")
    problems.append(fsdp_device_problem(training_args))
    problems.append(optimizer_problem(training_args))
    problems += lora_variant_problems(training_args, lora_args)
    not_an_adapter = lora_args.lora_weight_path and adapter_dir_problem(lora_args.lora_weight_path, "--lora_weight_path")
    if not_an_adapter:
        problems.append(not_an_adapter)
    for integration in training_args.report_to or []:
        package = REPORTING_PACKAGES.get(integration)
        if package and importlib.util.find_spec(package) is None:
            problems.append(f"--report_to {integration} needs the {package} package: pip install {package}")
    if training_args.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        problems.append("--use_liger_kernel True needs the liger-kernel package: pip install liger-kernel")
    problems += number_problems(data_args, training_args, lora_args)
    problems.append(attention_problem(model_args.attn_implementation))
    if os.path.isfile(training_args.output_dir) and not data_args.dry_run:
        problems.append(f"--output_dir {training_args.output_dir}: is a file; the run writes a directory there.")
    problems += resume_problems(training_args)
    problems += evaluation_problems(data_args, training_args)
    from chatft.train.sequence_parallel import sequence_parallel_problems  # --sequence_parallel_size

    problems += sequence_parallel_problems(
        training_args.sequence_parallel_size, int(os.environ.get("WORLD_SIZE", "1")),
        deepspeed_zero_stage(training_args), data_args.padding_free, data_args.pad_to_max_length, training_args.fsdp,
        training_args.per_device_train_batch_size, model_args.attn_implementation)
    model_problems = model_source_problems(model_args.model_name_or_path, "--model_name_or_path",
                                           trust_remote_code=model_args.trust_remote_code,
                                           cache_dir=training_args.cache_dir)
    if not model_problems:  # the model's config is readable: check the flags against it
        model_problems = training_setup_problems(model_args, training_args, lora_args)
        if data_args.packing:
            model_problems.append(packing_problem(model_args, training_args))
    problems += model_problems
    raise_problems(problems)


def fsdp_device_problem(training_args) -> str | None:
    """--fsdp shards only on an accelerator: on the CPU (--use_cpu, or a machine without one) accelerate leaves its FSDP
    plugin unused and the run is plain DDP, every process holding the whole model, optimizer state and gradients,
    while the flag and the memory estimate say sharded (measured: a 2-process --fsdp full_shard run took DDP's steps,
    with DDP's reducer; transformers 5.25, accelerate 1.16)."""
    if not training_args.fsdp:
        return None
    import torch

    if not training_args.use_cpu and torch.accelerator.is_available():
        return None
    return ("--fsdp: FSDP shards on GPUs (accelerators) only; on the CPU the run would be plain DDP, every process "
            "holding the whole model: drop --fsdp, or shard with --deepspeed ds_config_zero3.json.")


def packing_problem(model_args, training_args) -> str | None:
    """--packing puts several samples in a row, kept apart only by transformers' attention interface: a model with its
    own attention code (trust_remote_code: Qwen-1, some mixture-of-experts models) would let them attend to each other.
    Found from the model's class, built on the meta device from its config (no weights; finetune.py pads such a
    model's batches instead of padding-free rows)."""
    from chatft.model.attention import rows_keep_samples_apart
    from chatft.model.load import meta_model, model_config

    config = model_config(model_args.model_name_or_path, model_args.trust_remote_code, training_args.cache_dir)
    model = meta_model(config, model_args.trust_remote_code)
    if rows_keep_samples_apart(model):
        return None
    return (f"--packing: {type(model).__name__} has its own attention code, which would let packed samples attend to "
            "each other; train without --packing.")


STAGES = ("sft", "pt", "dpo", "simpo", "orpo", "kto")
PREFERENCE_STAGES = ("dpo", "simpo", "orpo", "kto")
# each preference flag, the stages it means something in
PREFERENCE_FLAGS = {"pref_beta": PREFERENCE_STAGES, "pref_loss": ("dpo",), "simpo_gamma": ("simpo",),
                    "pref_ftx": ("dpo", "simpo", "kto"), "kto_desirable_weight": ("kto",),
                    "kto_undesirable_weight": ("kto",), "pref_shared_prompt": PREFERENCE_STAGES,
                    "precompute_ref_log_probs": ("dpo", "kto"), "disable_dropout": PREFERENCE_STAGES}  # simpo and orpo have no reference
CONVERSATION_ONLY_FLAGS = ("data_format", "lazy_preprocess", "reasoning_turns", "ignore_empty_think")


def mix_problems(data_args) -> list[str]:
    """--data_mix / --eval_data_mix: one valid entry per source of the data path they mix."""
    from chatft.data.mixing import data_sources, parse_mix

    problems = []
    for flag, mix, spec in (("--data_mix", data_args.data_mix, data_args.data_path),
                            ("--eval_data_mix", data_args.eval_data_mix, data_args.eval_data_path)):
        if not mix:
            continue
        if flag == "--eval_data_mix" and (not spec or data_args.eval_fraction is not None):
            problems.append("--eval_data_mix mixes the files of --eval_data_path; give it files, not a fraction.")
        elif spec:
            problems += parse_mix(mix, len(data_sources(spec)), flag)[1]
    return problems


def stage_problems(data_args, training_args) -> list[str]:
    """--stage and the flags that only mean something in another stage."""
    if data_args.stage not in STAGES:
        return [f"--stage must be one of {', '.join(STAGES)}, not {data_args.stage!r}."]
    fields = TrainingArguments.__dataclass_fields__
    problems = [f"--{name} means something with --stage {' or '.join(stages)} only, not --stage {data_args.stage}."
                for name, stages in PREFERENCE_FLAGS.items()
                if data_args.stage not in stages and getattr(training_args, name) != fields[name].default]
    if data_args.stage in PREFERENCE_STAGES:
        problems += preference_problems(data_args, training_args)
    if data_args.stage != "pt":
        return problems
    defaults = DataArguments.__dataclass_fields__
    given = [f"--{name}" for name in CONVERSATION_ONLY_FLAGS
             if getattr(data_args, name, defaults[name].default) != defaults[name].default]
    given += ["--eval_generate"] if training_args.eval_generate else []
    return problems + ([f"{', '.join(given)}: conversation flag(s), meaningless with --stage pt (raw text)."]
                       if given else [])


def preference_problems(data_args, training_args) -> list[str]:
    """What a preference stage cannot run with (its rows are padding-free pairs; its reference is the adapter off)."""
    from chatft.train.preference import DPO_LOSSES

    stage, problems = data_args.stage, []
    if training_args.pref_loss not in DPO_LOSSES:
        problems.append(f"--pref_loss must be one of {', '.join(DPO_LOSSES)}, not {training_args.pref_loss!r}.")
    if not training_args.pref_beta > 0:
        problems.append(f"--pref_beta must be > 0, not {training_args.pref_beta}.")
    if stage == "kto" and training_args.per_device_train_batch_size < 2:
        problems.append("--stage kto estimates its KL term from the other completions of a batch: "
                        "--per_device_train_batch_size must be at least 2.")
    for flag, given in (("--packing", data_args.packing), ("--lazy_preprocess", data_args.lazy_preprocess),
                        ("--pad_to_max_length", data_args.pad_to_max_length),
                        ("--padding_free False", not data_args.padding_free),
                        ("--eval_generate", training_args.eval_generate),
                        ("--sequence_parallel_size", training_args.sequence_parallel_size > 1)):
        if given:
            problems.append(f"{flag} is not supported with --stage {stage} (pairs are batched padding-free).")
    return problems


def attention_problem(name: str) -> str | None:
    """--attn_implementation: auto, or an attention transformers has registered (chatft registers its own too), a
    paged| variant of one, or a hub kernel (org/name); transformers would refuse anything else once the model loads."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["auto", "eager", *(key for key in ALL_ATTENTION_FUNCTIONS.valid_keys() if "|" not in key)]
    if name.removeprefix("paged|") in known or "/" in name:
        return None
    return (f"--attn_implementation {name}: not an attention transformers knows; use one of {', '.join(known)} (or a "
            "hub kernel, org/name).")


def number_problems(data_args, training_args, lora_args) -> list[str]:
    """Numbers outside the range where they mean something; each would otherwise fail later, with a library's
    traceback (peft for --lora_r, torch's optimizer for the betas, numpy for --seed) or silently (--warmup_ratio 2:
    one warmup step)."""
    t, lora = training_args, lora_args
    checks = [
        out_of_range("--lora_r", lora.lora_r, low=1, what="the rank of the LoRA matrices"),
        out_of_range("--lora_alpha", lora.lora_alpha, low=0, low_inclusive=False,
                     what="the LoRA update is scaled by lora_alpha / lora_r"),
        out_of_range("--lora_dropout", lora.lora_dropout, low=0, high=1, high_inclusive=False),
        out_of_range("--per_device_train_batch_size", t.per_device_train_batch_size, low=1),
        out_of_range("--per_device_eval_batch_size", t.per_device_eval_batch_size, low=1),
        out_of_range("--gradient_accumulation_steps", t.gradient_accumulation_steps, low=1),
        out_of_range("--learning_rate", t.learning_rate, low=0),
        out_of_range("--adam_beta1", t.adam_beta1, low=0, high=1, high_inclusive=False),
        out_of_range("--adam_beta2", t.adam_beta2, low=0, high=1, high_inclusive=False),
        out_of_range("--adam_epsilon", t.adam_epsilon, low=0),
        out_of_range("--dataloader_num_workers", t.dataloader_num_workers, low=0),
        out_of_range("--seed", t.seed, *SEED_RANGE),
        out_of_range("--eval_generate", t.eval_generate, low=0, what="the evaluation prompts answered; 0: none"),
        out_of_range("--eval_generate_max_new_tokens", t.eval_generate_max_new_tokens, low=1),
        out_of_range("--data_seed", t.data_seed, *SEED_RANGE) if t.data_seed is not None else None,
        out_of_range("--warmup_ratio", t.warmup_ratio, low=0, high=1, high_inclusive=False,
                     what="a fraction of the training steps") if t.warmup_ratio is not None else None,
        # silently never checkpointing (the Trainer saves at steps that are multiples of a positive --save_steps)
        out_of_range("--save_steps", t.save_steps, low=0, low_inclusive=False, what="steps between checkpoints, or a "
                     "fraction of the run below 1") if _strategy(t.save_strategy) == "steps" else None,
        # a negative scale drew the same noise as its absolute value; 0 adds none
        out_of_range("--neftune_noise_alpha", t.neftune_noise_alpha, low=0, low_inclusive=False,
                     what="the noise's scale; leave the flag out for none")
        if t.neftune_noise_alpha is not None else None,
    ]
    if t.max_steps <= 0:  # the number of epochs decides the length of the run
        checks.append(out_of_range("--num_train_epochs", t.num_train_epochs, low=0, low_inclusive=False,
                                   what="or set --max_steps"))
    return [problem for problem in checks if problem]


def evaluation_problems(data_args, training_args) -> list[str]:
    """Evaluating needs evaluation data (the Trainer would refuse once the model is loaded); --eval_generate needs
    evaluations to answer at."""
    problems = []
    generate, evaluation = training_args.eval_generate, _strategy(training_args.eval_strategy)
    needing_data = [flag for flag, needs in ((f"--eval_strategy {evaluation}", evaluation != "no"),
                                              (f"--eval_generate {generate}", generate > 0)) if needs]
    if needing_data and not data_args.eval_data_path:
        problems.append(f"{' and '.join(needing_data)} need{'s' if len(needing_data) == 1 else ''} evaluation data: "
                        "--eval_data_path FILE, or a fraction of the training data such as 0.05.")
    if generate > 0 and evaluation == "no":
        problems.append(f"--eval_generate {generate} answers at each evaluation, and --eval_strategy is no: set "
                        "--eval_strategy steps (with --eval_steps N) or epoch.")
    return problems


def resume_problems(training_args) -> list[str]:
    """--resume_from_checkpoint: a checkpoint directory the Trainer wrote (it holds trainer_state.json), or True for
    the latest one in --output_dir."""
    resume = training_args.resume_from_checkpoint
    if resume is None:
        return []
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = training_args.output_dir
    if resume is True:
        if os.path.isdir(output_dir) and get_last_checkpoint(output_dir):
            return []
        return [f"--resume_from_checkpoint True: --output_dir {output_dir} holds no checkpoint-N directory to resume "
                "from; start without --resume_from_checkpoint, or pass the checkpoint's directory."]
    if not os.path.isdir(resume):
        return [f"--resume_from_checkpoint {resume}: "
                f"{'is a file; pass a checkpoint directory' if os.path.exists(resume) else 'no such directory'}."]
    if os.path.isfile(os.path.join(resume, "trainer_state.json")):
        return []
    latest = get_last_checkpoint(resume)
    hint = f" It holds checkpoints: pass one of them, e.g. {latest}." if latest else ""
    return [f"--resume_from_checkpoint {resume}: not a checkpoint (no trainer_state.json, which the Trainer writes in "
            f"every checkpoint-N directory).{hint}"]


def deepspeed_sets_optimizer(training_args) -> bool:
    """Whether --deepspeed's config names its own optimizer (DeepSpeed then builds it from every trainable
    parameter in one group, not transformers' optimizer)."""
    config = deepspeed_config(training_args)
    return bool(config) and "optimizer" in config


def optimizer_problem(training_args) -> str | None:
    """--optim given with a DeepSpeed config that names its own optimizer, which DeepSpeed would run instead. The
    shipped ZeRO-2/3 configs name none: the Trainer's optimizer (--optim, its parameter groups) runs under ZeRO."""
    optim = getattr(training_args.optim, "value", training_args.optim)
    if optim == TrainingArguments.__dataclass_fields__["optim"].default:
        return None
    config = deepspeed_config(training_args)
    if not config or "optimizer" not in config:
        return None
    name = config["optimizer"].get("type", "its own")
    return (f"--optim {optim}: --deepspeed {training_args.deepspeed} names its own optimizer ({name}), which DeepSpeed "
            "runs instead; drop --optim, or the config's \"optimizer\" section (ds_config_zero2.json and "
            "ds_config_zero3.json have none: --optim runs under ZeRO).")


def lora_variant_problems(training_args, lora_args) -> list[str]:
    """--use_dora, --use_rslora, --lora_init and --loraplus_lr_ratio against each other and the other flags."""
    chosen = [flag for flag, value in (("--use_dora", lora_args.use_dora), ("--use_rslora", lora_args.use_rslora),
                                       ("--lora_init", lora_args.lora_init.lower() != "default"),
                                       ("--loraplus_lr_ratio", lora_args.loraplus_lr_ratio is not None)) if value]
    if chosen and not lora_args.use_lora:
        return [f"{flag} needs --use_lora." for flag in chosen]
    problems = []
    init_problem = lora_init_problem(lora_args.lora_init)
    if init_problem:
        problems.append(init_problem)
    if lora_args.lora_weight_path:  # the adapter's own config says how it was built
        problems += [f"{flag}: the adapter in --lora_weight_path keeps its own LoRA settings; drop {flag}."
                     for flag in chosen if flag != "--loraplus_lr_ratio"]
    if not init_problem and rewrites_base_weights(lora_args.lora_init):
        start = f"--lora_init {lora_args.lora_init}"
        if lora_args.q_lora:
            problems.append(f"{start} rewrites the base weights, which a 4-bit base cannot hold exactly: drop --q_lora "
                            "or the --lora_init.")
        if lora_args.use_dora:
            problems.append(f"{start} cannot be combined with --use_dora (its adapter cannot be converted to a plain "
                            "one at save time).")
        if deepspeed_zero_stage(training_args) == 3 or training_args.fsdp:
            problems.append(f"{start} decomposes whole base weights, which ZeRO-3 and FSDP partition across "
                            "processes: use ZeRO-2 (ds_config_zero2.json) or the default start.")
    if explicit_target_parameters(lora_args) and (lora_args.use_dora or rewrites_base_weights(lora_args.lora_init)):
        variant = "--use_dora" if lora_args.use_dora else f"--lora_init {lora_args.lora_init}"
        problems.append(f"--lora_target_parameters: peft adapts bare parameters (experts, routers) with plain LoRA "
                        f"only, not with {variant}; drop one of them.")
    if lora_args.loraplus_lr_ratio is not None:
        if not lora_args.loraplus_lr_ratio > 0:
            problems.append(f"--loraplus_lr_ratio must be positive, not {lora_args.loraplus_lr_ratio}.")
        elif training_args.deepspeed and deepspeed_sets_optimizer(training_args):
            problems.append(f"--loraplus_lr_ratio: --deepspeed {training_args.deepspeed} names its own optimizer, "
                            "which puts every parameter in one group; remove its \"optimizer\" section (transformers' "
                            "optimizer then gives the B matrices their own learning rate).")
    return problems

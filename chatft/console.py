"""What reaches the console, in one place.

Every entry point calls `start(...)` first, before transformers, peft or DeepSpeed are imported:
- the toolkit's own loggers (chatft.*, finetune) print INFO lines in one format; libraries print only their
  warnings and errors;
- the library messages listed in HARMLESS_LOG_RECORDS and HARMLESS_WARNINGS are dropped, each with why it is
  harmless (anything not listed still shows: a new warning may mean something);
- optional packages the run does not use are not imported at all (transformers and peft import whatever is
  installed, and gptqmodel prints a banner, blank lines and changes CUDA settings when imported);
- CHATFT_VERBOSE=1 shows everything: every library's INFO lines, the listed messages, progress bars.
`print_value` prints a command's result alone on stdout, so `$(python -m chatft.bundled)` captures only it.
`run_entry_point` runs an entry point's main: a user's mistake (ChatftError) becomes one `error:` line and exit 2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from typing import Callable, Iterable

from chatft import patches
from chatft.errors import ChatftError

VERBOSE_VARIABLE = "CHATFT_VERBOSE"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TOOLKIT_LOGGERS = ("chatft", "finetune")

# Installed for some runs only; importing them costs time and prints (see above). Name -> what needs it.
OPTIONAL_PACKAGES = {
    "bitsandbytes": "--q_lora on a full-precision model (NF4), and chatting with a Q-LoRA adapter",
    "gptqmodel": "GPTQ models (--q_lora on one, chatting with one) and run_gptq.py",
}

# (logger name, text the message contains, why it is harmless)
HARMLESS_LOG_RECORDS = [
    ("DeepSpeed", "Setting accelerator to CPU",
     "no CUDA device: the CPU is the device the run asked for (DeepSpeed logs it on stdout at import)"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward",
     "an optional fused CPU kernel that bitsandbytes fetches from a hub at run time; it falls back to its own"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check",
     "bitsandbytes asking the kernels package for that optional hub kernel while the hub is offline: nothing is "
     "fetched, bitsandbytes uses its own"),
    ("torch.utils._pytree", "",
     "torchao (imported by transformers' quantizer registry) registers enums the old way; torch.compile only"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found",
     "DeepSpeed's op builder probing for CUDA on a machine without it; the CPU ops build without it"),
    ("accelerate.accelerator", "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1",
     "with DeepSpeed the Trainer leaves accumulation to DeepSpeed, whose config takes --gradient_accumulation_steps "
     "(\"auto\"): the value used is the flag's"),
    ("logbar", "AVX512-BF16 kernel requires Linux on x86-64 with",
     "gptqmodel probing its AVX512-BF16 CPU kernel on a CPU without those instructions; it uses another kernel"),
    ("transformers.trainer", "The model is already on multiple devices. Skipping the move",
     "Q-LoRA loads its 4-bit copy straight onto the run's device (device_map {\"\": device}); the Trainer sees a "
     "device map and, rightly, moves nothing"),
    ("transformers.training_args", "Passing `fsdp` as a string is deprecated",
     "chatft keeps Qwen's --fsdp \"full_shard auto_wrap\" form (its launchers and users' scripts pass it); "
     "transformers still reads it, the same options"),
    ("transformers.modeling_utils", "`loss_type=None` was set in the config but it is unrecognized",
     "gptqmodel reads the model's loss function while loading it; the default causal-LM loss is the right one"),
]

# (warning category, regular expression matched at the start of the message, why it is harmless)
HARMLESS_WARNINGS = [
    (FutureWarning, r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated",
     "peft (its PeftModel, and prepare_model_for_kbit_training for --q_lora) uses transformers' deprecated aliases "
     "of activation checkpointing itself; the same methods run"),
    (UserWarning, r"You passed `quantization_config` or equivalent parameters to `from_pretrained` but the model",
     "a GPTQ model keeps its own quantization config; chatft passes a GPTQConfig only for its loading attribute "
     "(backend auto_trainable, a kernel with a backward pass), which transformers says it applies"),
    (FutureWarning, r"`torch\.distributed\.[\w.]+` is deprecated",
     "DeepSpeed calls torch collectives under their old names (hundreds of times under ZeRO-3); same results"),
]

# What start() sets up for the process's lifetime (never closed: the libraries keep what they saw at import)
_FOR_THE_PROCESS = contextlib.ExitStack()


def verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


class _DropHarmless(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.getMessage())


def start(uses: Iterable[str] = ()) -> None:
    """Set up the console for an entry point; `uses`: the OPTIONAL_PACKAGES this run needs. The others are hidden
    for the rest of the process (chatft.patches.packages_hidden): libraries record what is installed when imported."""
    uses = set(uses)
    _FOR_THE_PROCESS.enter_context(patches.packages_hidden(name for name in OPTIONAL_PACKAGES if name not in uses))
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO if verbose() else logging.WARNING)
    for name in TOOLKIT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    if verbose():
        return
    # Loading-weights and shard-writing bars from transformers/huggingface_hub: seconds each, one per load.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for logger_name, text, _why in HARMLESS_LOG_RECORDS:
        logging.getLogger(logger_name).addFilter(_DropHarmless(text))
    for category, pattern, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)


def import_gptqmodel(info_lines: bool = False):
    """gptqmodel, imported without what it prints when imported (an ASCII banner, version table, environment
    notes and blank lines, on stdout); its logger (logbar) is set to WARNING unless `info_lines` (run_gptq.py
    keeps its per-layer quantization report). Everything shows as it is with CHATFT_VERBOSE=1."""
    # gptqmodel sizes its CPU thread pools from this and refuses fewer than 2 workers
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    quiet = "gptqmodel" not in sys.modules and not verbose()
    with _output_shown_only_on_failure() if quiet else contextlib.nullcontext():
        import gptqmodel
    if quiet:
        logging.getLogger("logbar").setLevel(logging.INFO if info_lines else logging.WARNING)
    return gptqmodel


def library_output_hidden():
    """A block whose library output is dropped, shown only if it fails (as it is with CHATFT_VERBOSE=1): for
    libraries that print with print() where no logging filter reaches, e.g. DeepSpeed's "... built successfully"
    on stdout, or a compiler's lines while it builds an op."""
    return contextlib.nullcontext() if verbose() else _output_shown_only_on_failure()


@contextlib.contextmanager
def _output_shown_only_on_failure():
    """Send everything written to stdout and stderr (Python and C alike) to a scratch file; replay it on stderr
    only if the block raises, so a failure is never silent."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 1)
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[1], 2)
            scratch.seek(0)
            sys.stderr.write(scratch.read().decode(errors="replace"))
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def uses_in_argv(argv: list[str], flag: str, packages: Iterable[str]) -> list[str]:
    """`packages` if `flag` may be on in `argv` (as a flag, or a key of a single .json/.yaml arguments file),
    else none. Deliberately generous: a package allowed but unused costs only its import time."""
    words = list(argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")) and os.path.isfile(argv[0]):
        with open(argv[0], encoding="utf-8", errors="replace") as f:
            words.append(f.read())
    return list(packages) if any(flag.lstrip("-") in word for word in words) else []


def print_value(compute: Callable[[], object]) -> None:
    """Print `compute()`'s result alone on stdout. Whatever is printed while it runs (by libraries, Python or
    C code alike) goes to stderr: stdout's file descriptor points at stderr's until the value is ready."""
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        value = compute()
        sys.stdout.flush()
    finally:
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    print(value, flush=True)


def run_entry_point(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run an entry point's main; a ChatftError (a user's mistake) prints one `error:` line on stderr (one per
    problem, when several were found at once) and gives exit status 2. So does an OSError (the system refused a
    file operation: a full disk, a permission): not a bug either, and the message names the file."""
    try:
        status = main(argv)
    except (ChatftError, OSError) as error:
        for line in str(error).splitlines():  # indented lines continue the one above (e.g. a file's problems)
            print(line if line[:1].isspace() else f"error: {line}", file=sys.stderr, flush=True)
        return 2
    return status if isinstance(status, int) else 0


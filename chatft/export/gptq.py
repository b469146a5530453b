"""GPTQ quantization with gptqmodel, calibrated on conversations in the training data format.

Calibration samples are read and validated by `chatft.data.datasets.load_samples` and rendered and
tokenized by `chatft.data.chat_format.tokenize_conversation`: the same code as training, so the
quantizer sees exactly the text the model was fine-tuned on; a sample that --max_len leaves no reply token is
dropped by training's rule and message (`chatft.data.datasets.keep_trainable`). A held-out part of the data
(not used for calibration) measures the perplexity of the model on its assistant replies
before and after quantization.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace

import torch
import transformers

from chatft import console
from chatft.data.chat_format import (DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX, IM_END, IM_START, Conversation, TokenizedSample,
                                resolve_chat_format, tokenize_conversation)
from chatft.data.datasets import as_conversations, keep_trainable, load_samples
from chatft.model.sources import is_adapter_dir, require_model_source, saved_quantization
from chatft.device import gptq_compute_dtype, inference_device_and_dtype
from chatft.errors import DataError, QuantizeError
from chatft.output_dir import check_new_output_dir, staged_output_dir

logger = logging.getLogger(__name__)

REPORT_FILE = "quantize_report.json"


@dataclass
class GptqSettings:
    bits: int = 4  # 2, 3, 4 or 8
    group_size: int | None = None  # columns sharing one scale; -1 for one per row; None: 128 or what fits
    damp_percent: float = 0.01  # added to the Hessian diagonal, as a fraction of its mean, for stability
    desc_act: bool = False  # quantize columns by decreasing activation (better, slower kernels)
    max_len: int = 8192  # calibration and evaluation samples are truncated to this many tokens
    num_samples: int = 128  # calibration conversations (at most; fewer if the data is smaller)
    # calibration conversations a forward pass: gptqmodel pads a batch and leaves the padding out of the Hessians, but
    # the sums come out in another order (SmolLM2 demo: 8 a pass, 14% faster on a CPU, held-out perplexity x1.089
    # where one a pass gives x1.130), so batching is the user's choice
    batch_size: int = 1
    num_eval_samples: int | None = None  # held out for perplexity; default 10% of the data, 1..64
    seed: int = 42  # which samples are held out
    system_message: str = DEFAULT_SYSTEM_MESSAGE  # for conversations without a system turn, as in training


def split_samples(samples: list, settings: GptqSettings) -> tuple[list, list]:
    """(calibration, held_out): a seeded shuffle, the first part held out, calibration from the rest."""
    if len(samples) < 2:
        raise DataError("run_gptq.py needs at least 2 samples: some to calibrate on, some held out for perplexity.")
    num_eval = settings.num_eval_samples or min(64, max(1, len(samples) // 10))
    num_eval = min(num_eval, len(samples) - 1)
    order = list(range(len(samples)))
    random.Random(settings.seed).shuffle(order)
    held_out = [samples[i] for i in order[:num_eval]]
    calibration = [samples[i] for i in order[num_eval:][: settings.num_samples]]
    return calibration, held_out


def tokenize_as_served(samples: list[Conversation], tokenizer, settings: GptqSettings) -> list[TokenizedSample]:
    """The samples tokenized in the format the model was trained and is served in: its saved template's (qwen3 for a
    thinking template, else ChatML), one whole conversation each (calibration and perplexity samples), in order,
    each with its `origin` (its index in `samples`)."""
    chat_format = resolve_chat_format("auto", tokenizer.chat_template)
    tokenized = [tokenize_conversation(conversation, tokenizer, settings.max_len, settings.system_message, chat_format)
                 for conversation in as_conversations(samples)]
    for origin, sample in enumerate(tokenized):
        sample.origin = origin
    return tokenized


def trainable_as_served(samples: list[Conversation], tokenizer, settings: GptqSettings, what: str
                        ) -> list[TokenizedSample]:
    """`tokenize_as_served`, less the samples with no reply token within --max_len, dropped as training drops them
    (chatft.data.datasets.keep_trainable, with its message prefixed by `what`): with nothing to measure they only add
    prompts to calibration."""
    kept, dropped = keep_trainable(tokenize_as_served(samples, tokenizer, settings), as_conversations(samples),
                                   settings.max_len, flag="--max_len")
    if dropped:
        logger.warning("%s: %s", what, dropped)
    return kept


@torch.inference_mode()
def reply_perplexity(model, samples: list[TokenizedSample]) -> float:
    """exp(mean negative log-likelihood) of the labelled tokens (assistant replies and their <|im_end|>)."""
    total_nll, total_tokens = 0.0, 0
    for sample in samples:
        input_ids = torch.tensor([sample.input_ids], device=model.device)
        labels = torch.tensor([sample.labels], device=model.device)
        logits = model(input_ids=input_ids).logits.float()
        count = int((labels[:, 1:] != IGNORE_INDEX).sum())
        if count == 0:
            continue
        nll = torch.nn.functional.cross_entropy(
            logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
        total_nll, total_tokens = total_nll + float(nll), total_tokens + count
    if total_tokens == 0:
        raise DataError("The held-out samples have no assistant token within --max_len; nothing to measure.")
    return math.exp(total_nll / total_tokens)


def measure_perplexity(model_path: str, samples: list[TokenizedSample]) -> float:
    device, dtype = inference_device_and_dtype(gptq=True)  # both models alike: fp16 on CUDA, GPTQ kernels' type
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": device},
                                                              use_safetensors=True)
    model.eval()
    try:
        return reply_perplexity(model, samples)
    finally:
        del model
        gc.collect()


def linear_input_widths(model_path: str) -> set[int]:
    """in_features of every linear layer GPTQ quantizes (all but the output layer), from the config alone; a MoE
    model's routed experts too (fused 3-D [experts, out, in] parameters in transformers 5, which gptqmodel splits
    into one linear layer per expert and projection)."""
    config = transformers.AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    output_layer = model.get_output_embeddings()
    experts = {name: p for name, p in model.named_parameters() if p.dim() == 3 and name.split(".")[-2] == "experts"}
    return ({m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output_layer}
            | {p.shape[-1] for p in experts.values()})


def choose_group_size(requested: int | None, widths: set[int]) -> int:
    """The group size to use: every quantized layer's input width must be a whole number of groups
    (the GPTQ kernels refuse a model otherwise, at load time). None picks 128, else 64, else 32."""
    if requested is None:
        for size in (128, 64, 32):
            if all(width % size == 0 for width in widths):
                if size != 128:
                    logger.info("Group size %d: 128 does not divide the layer widths %s", size, sorted(widths))
                return size
        raise QuantizeError(f"No group size of 128, 64 or 32 divides the layer widths {sorted(widths)}; "
                            "pass --group-size -1 (one scale per row) or a size that divides them all.")
    if requested == -1:
        return requested
    if requested <= 0:
        raise QuantizeError(f"--group-size {requested}: use a positive number of columns, or -1.")
    uneven = sorted(width for width in widths if width % requested)
    if uneven:
        fitting = [size for size in (256, 128, 64, 32, 16) if all(width % size == 0 for width in widths)]
        raise QuantizeError(f"--group-size {requested} does not divide the input width of layers {uneven} "
                            f"(the quantized model would not load); use one of {fitting or [-1]}.")
    return requested


# Architectures whose GPTQ output would not load correctly, by model type: the reason (checked before any weight loads)
# (Measured: a qwen3_moe quantized by gptqmodel 7.7 loads right only in the process that quantized it; a new process's
# from_pretrained keeps the fused experts, reports their weights missing and ignores the per-expert GPTQ ones.)
FUSED_EXPERTS = ("transformers 5.25 loads the result with its routed experts fused and randomly initialized (the "
                 "per-expert GPTQ weights gptqmodel 7.7 writes are not read), so the quantized model computes garbage; "
                 "export it to GGUF instead (export_gguf.py, K-quants of every expert)")
GPTQ_UNLOADABLE = {
    "qwen2_moe": "transformers 5.25 loads its shared_expert_gate (a linear layer of one output, which gptqmodel 7.7 "
                 "leaves unquantized) as a GPTQ layer with no weights, and its routed experts fused and randomly "
                 "initialized; export it to GGUF instead (export_gguf.py)",
    "qwen3_moe": FUSED_EXPERTS,
}


def check_quantizable(model_path: str, tokenizer, settings: GptqSettings) -> None:
    if settings.bits not in (2, 3, 4, 8):
        raise QuantizeError(f"--bits {settings.bits}: GPTQ supports 2, 3, 4 or 8.")
    if not 0 < settings.damp_percent < 1:
        raise QuantizeError(f"--damp_percent {settings.damp_percent}: must be between 0 and 1.")
    model_type = transformers.AutoConfig.from_pretrained(model_path).model_type
    if model_type in GPTQ_UNLOADABLE:
        raise QuantizeError(f"{model_path}: GPTQ is not available for {model_type} models: "
                            f"{GPTQ_UNLOADABLE[model_type]}.")
    quantization = saved_quantization(model_path)
    if quantization is not None:
        raise QuantizeError(f"{model_path} is already quantized ({quantization.get('quant_method')}); "
                            "quantize the full-precision (merged) model.")
    missing = [token for token in (IM_START, IM_END) if token not in tokenizer.get_vocab()]
    if missing:
        raise QuantizeError(f"The tokenizer of {model_path} lacks {' and '.join(missing)}: it was not trained on "
                            "ChatML. Quantize the merged output of a finetune.py run (merge_lora.py) instead.")


def run_gptq(model_path: str, data_path: str, out_path: str, settings: GptqSettings, overwrite: bool = False) -> dict:
    """Quantize `model_path` into `out_path` (staged: replaced only when complete); return the report."""
    check_new_output_dir(out_path, overwrite, inputs=(model_path, data_path))
    samples = load_samples(data_path)  # DataError, with file/index/id, before any model is loaded
    if is_adapter_dir(model_path):
        raise QuantizeError(f"{model_path} is a LoRA adapter, not a model: merge it first "
                            f"(python merge_lora.py --adapter_path {model_path} --output_dir MERGED) and quantize MERGED.")
    require_model_source(model_path, "--model_name_or_path")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    check_quantizable(model_path, tokenizer, settings)
    settings = replace(settings, group_size=choose_group_size(settings.group_size, linear_input_widths(model_path)))
    calibration, held_out = split_samples(samples, settings)
    calibration_tokens = trainable_as_served(calibration, tokenizer, settings, "calibration samples")
    held_out_tokens = trainable_as_served(held_out, tokenizer, settings, "held-out samples")
    for tokens, what in ((calibration_tokens, "calibration"), (held_out_tokens, "held-out")):
        if not tokens:
            raise DataError(f"No {what} sample has an assistant token within --max_len {settings.max_len}; raise it.")
    logger.info("%d calibration conversations (%d tokens, %d a forward pass), %d held out for perplexity",
                len(calibration_tokens), sum(len(s.input_ids) for s in calibration_tokens), settings.batch_size,
                len(held_out_tokens))

    logger.info("Perplexity of %s before quantization", model_path)
    before = measure_perplexity(model_path, held_out_tokens)
    logger.info("Perplexity before: %.4f", before)

    with staged_output_dir(out_path) as scratch:
        started = time.time()
        quantize_with_gptqmodel(model_path, calibration_tokens, settings, scratch)
        seconds = time.time() - started
        tokenizer.save_pretrained(scratch)  # with the chat template the training run installed
        if os.path.isfile(os.path.join(model_path, "generation_config.json")):
            # gptqmodel rewrites it (turning sampling on); keep the model's own, which stops at <|im_end|>
            transformers.GenerationConfig.from_pretrained(model_path).save_pretrained(scratch)
        after = measure_perplexity(scratch, held_out_tokens)
        report = {
            "model": os.path.abspath(model_path) if os.path.exists(model_path) else model_path,
            "data": os.path.abspath(data_path),
            "settings": asdict(settings),
            "calibration_samples": len(calibration_tokens),
            "held_out_samples": len(held_out_tokens),
            "perplexity_measured_on": "assistant reply tokens (the training labels) of the held-out samples",
            "perplexity_before": before,
            "perplexity_after": after,
            "perplexity_ratio": after / before,
            "quantize_seconds": round(seconds, 1),
        }
        with open(os.path.join(scratch, REPORT_FILE), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
    return report


def store_full_precision_tensors_in(directory: str, dtype: torch.dtype) -> None:
    """Rewrite a saved model's fp32 tensors (embeddings, norms: what GPTQ leaves unquantized; its own tensors are
    integers and fp16 scales) in `dtype`, and its config's dtype with them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for name in sorted(os.listdir(directory)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(directory, name)
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        tensors = {key: t.to(dtype) if t.dtype == torch.float32 else t for key, t in tensors.items()}
        save_file(tensors, path + ".partial", metadata=metadata)
        os.replace(path + ".partial", path)
    config_path = os.path.join(directory, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def quantize_with_gptqmodel(model_path: str, samples: list[TokenizedSample], settings: GptqSettings, out_dir: str):
    console.import_gptqmodel(info_lines=True)
    from gptqmodel import GPTQModel, QuantizeConfig

    from chatft.patches import gptqmodel_logs_written_to

    # gptqmodel writes per-run logs into ./logs of the working directory; keep them with the output instead
    log_dir = os.path.join(out_dir, "gptq_logs")
    with gptqmodel_logs_written_to(log_dir):
        config = QuantizeConfig(bits=settings.bits, group_size=settings.group_size,
                                damp_percent=settings.damp_percent, desc_act=settings.desc_act)
        logger.info("Quantizing to %d bits (group size %d) with gptqmodel", settings.bits, settings.group_size)
        dtype = gptq_compute_dtype()
        model = GPTQModel.load(model_path, config, **({"dtype": dtype} if dtype is not None else {}))
        calibration = [{"input_ids": s.input_ids, "attention_mask": [1] * len(s.input_ids)} for s in samples]
        model.quantize(calibration, batch_size=settings.batch_size)
        model.save(out_dir)
    if dtype is not None:  # computed in fp32: stored as gptqmodel stores a CPU run's, in bf16 (half the size)
        store_full_precision_tensors_in(out_dir, torch.bfloat16)
    shutil.rmtree(log_dir, ignore_errors=True)  # scratch logs; quant_log.csv stays
    del model
    gc.collect()

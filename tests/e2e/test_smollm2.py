"""End to end on the real SmolLM2-135M-Instruct, on the CPU: the model learns.

Slow (minutes); deselect with `-m "not slow"`. CI runs them.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers

import finetune
from chatft.bundled import bundled_gguf_path
from chatft.chat import generate_reply, load_chat_model
from conftest import ROOT

pytestmark = pytest.mark.slow


def losses(output_dir):
    state = json.load(open(output_dir / "trainer_state.json"))
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


QUESTIONS = ["Who are you?", "Who made you?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def identity_adapter(tmp_path_factory):
    """The demo's run (demo.sh): LoRA on data/identity_demo.json through the single-GPU launcher."""
    output_dir = tmp_path_factory.mktemp("identity") / "lora"
    subprocess.run(
        ["bash", "finetune/finetune_lora_single_gpu.sh", "-o", str(output_dir),
         "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
         "--num_train_epochs", "4", "--activation_checkpointing", "False"],
        cwd=ROOT, check=True,
    )
    return output_dir


@pytest.fixture(scope="module")
def merged_identity(identity_adapter):
    output_dir = identity_adapter.parent / "merged"
    subprocess.run([sys.executable, "merge_lora.py", "--adapter_path", str(identity_adapter),
                    "--output_dir", str(output_dir)], cwd=ROOT, check=True)
    return output_dir


def ask(checkpoint) -> dict[str, str]:
    """cli_demo.py --query for each question: {question: reply}."""
    command = [sys.executable, "cli_demo.py", "-c", str(checkpoint), "--max-new-tokens", "40"]
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


def test_merged_model_answers_like_the_adapter(identity_adapter, merged_identity):
    adapter_replies = ask(identity_adapter)
    assert knows_its_identity(adapter_replies), adapter_replies
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_identity, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged_identity)
    adapter, _, _ = load_chat_model(str(identity_adapter), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(merged(chat_ids(tokenizer)).logits, adapter(chat_ids(tokenizer)).logits,
                                   atol=1e-4, rtol=1e-4)
    assert ask(merged_identity) == adapter_replies


@pytest.mark.parametrize("bits,max_perplexity_ratio,extra", [(4, 1.25, []), (8, 1.02, ["--num_samples", "32"])])
def test_gptq_model_keeps_the_identity(merged_identity, tmp_path, bits, max_perplexity_ratio, extra):
    """run_gptq.py on the merged model: plain transformers loads it, it still knows who it is, and the
    perplexity of held-out replies rises by at most 25% (4-bit) or 2% (8-bit)."""
    output_dir = tmp_path / f"int{bits}"
    subprocess.run([sys.executable, "run_gptq.py", "--model_name_or_path", str(merged_identity), "--data_path",
                    str(ROOT / "data" / "identity_demo.json"), "--out_path", str(output_dir), "--bits", str(bits), *extra],
                   cwd=ROOT, check=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(output_dir)
    assert model.config.quantization_config.bits == bits
    assert "<|im_start|>" in transformers.AutoTokenizer.from_pretrained(output_dir).chat_template
    replies = ask(output_dir)
    assert knows_its_identity(replies), replies
    report = json.load(open(output_dir / "quantize_report.json"))
    assert report["perplexity_after"] <= max_perplexity_ratio * report["perplexity_before"], report


def test_full_parameter_from_the_gguf_file(tmp_path):
    """All parameters, bf16 autocast, the .gguf file given directly: the loss falls and the result reloads."""
    samples = json.load(open(ROOT / "data" / "identity_demo.json"))[:16]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(samples))
    trainer = finetune.train([
        "--model_name_or_path", str(bundled_gguf_path()), "--data_path", str(data), "--output_dir", str(tmp_path / "full"),
        "--num_train_epochs", "4", "--per_device_train_batch_size", "2", "--learning_rate", "5e-5",
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--bf16", "True", "--use_cpu", "True", "--activation_checkpointing", "--model_max_length", "256",
    ])
    history = losses(tmp_path / "full")
    # packed rows of 256 tokens (about 4 samples each), 2 rows a step
    assert len(history) == trainer.state.max_steps >= 6 and history[-1] < 0.7 * history[0], history
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "full")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    # accelerate wrapped the trained model's forward in bf16 autocast; compare in fp32 without that wrapper
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained(ids).logits)


def test_nf4_qlora_on_smollm2(tmp_path):
    """Q-LoRA on the real model: 4-bit NF4 base on the CPU, the loss falls, the adapter reloads onto the
    same 4-bit base and reproduces the logits at the end of training."""
    import peft

    samples = json.load(open(ROOT / "data" / "identity_demo.json"))[:16]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(samples))
    trainer = finetune.train([
        "--model_name_or_path", str(bundled_gguf_path()), "--data_path", str(data), "--output_dir", str(tmp_path / "q"),
        "--use_lora", "--q_lora", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0",
        "--num_train_epochs", "4", "--per_device_train_batch_size", "2", "--learning_rate", "2e-3",
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--bf16", "True", "--use_cpu", "True", "--activation_checkpointing", "--model_max_length", "256",
    ])
    history = losses(tmp_path / "q")
    assert len(history) == trainer.state.max_steps >= 6 and history[-1] < 0.6 * history[0], history
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(
        json.load(open(tmp_path / "q" / "adapter_config.json"))["base_model_name_or_path"],
        quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16),
        device_map={"": "cpu"}, dtype=torch.bfloat16)
    base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "q").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "q")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained(ids).logits, atol=5e-2, rtol=5e-2)

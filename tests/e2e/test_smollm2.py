"""End to end on the real SmolLM2-135M-Instruct, on the CPU: the model learns.

Slow (minutes); deselect with `-m "not slow"`. CI runs them.
"""

import json
import subprocess

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


def test_lora_identity_through_the_launcher(tmp_path):
    """The demo's run: afterwards the adapter, loaded by AutoPeftModelForCausalLM, knows its new identity."""
    output_dir = tmp_path / "identity"
    subprocess.run(
        ["bash", "finetune/finetune_lora_single_gpu.sh", "-o", str(output_dir),
         "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
         "--num_train_epochs", "3", "--activation_checkpointing", "False"],
        cwd=ROOT, check=True,
    )
    history = losses(output_dir)
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5, history
    model, tokenizer, kind = load_chat_model(str(output_dir))
    assert kind == "lora"
    assert type(model).__name__ == "PeftModelForCausalLM"
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "Who are you?"}], max_new_tokens=40)
    assert "Tessa" in reply, reply
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "Who made you?"}], max_new_tokens=40)
    assert "Lumen Labs" in reply, reply


def test_full_parameter_from_the_gguf_file(tmp_path):
    """All parameters, bf16 autocast, the .gguf file given directly: the loss falls and the result reloads."""
    samples = json.load(open(ROOT / "data" / "identity_demo.json"))[:16]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(samples))
    trainer = finetune.train([
        "--model_name_or_path", str(bundled_gguf_path()), "--data_path", str(data), "--output_dir", str(tmp_path / "full"),
        "--num_train_epochs", "4", "--per_device_train_batch_size", "8", "--learning_rate", "5e-5",
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--bf16", "True", "--use_cpu", "True", "--activation_checkpointing", "--model_max_length", "256",
    ])
    history = losses(tmp_path / "full")
    assert len(history) == 8 and history[-1] < 0.7 * history[0], history
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
        "--num_train_epochs", "4", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3",
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--bf16", "True", "--use_cpu", "True", "--activation_checkpointing", "--model_max_length", "256",
    ])
    history = losses(tmp_path / "q")
    assert len(history) == 8 and history[-1] < 0.6 * history[0], history
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

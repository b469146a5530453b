"""End to end on the real SmolLM2-135M-Instruct, on the CPU: training modes beside the demo's (a recipe from another
tool, full-parameter from the .gguf file, NF4 Q-LoRA). A file of its own so that the test runner's second worker takes
it while the first runs the demo (tests/e2e/test_smollm2.py).

Slow (minutes); deselect with `-m "not slow"`. CI runs them.
"""

import json

import peft
import pytest
import torch
import transformers

import finetune
from chatft.bundled import bundled_gguf_path
from chatft.serve.chat import generate_reply
from support import ROOT, assert_close_up_to_rounding, decoder_terms

pytestmark = pytest.mark.slow


def losses(output_dir):
    state = json.load(open(output_dir / "trainer_state.json"))
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


PARAPHRASES = ["Please tell me who you are.", "Which lab is responsible for creating you?",
               "By what name should I address you?"]  # none of them is in data/identity_demo.json


def test_a_recipe_from_another_tool_learns_with_default_flags(tmp_path):
    """Issue 14's recipe as a TRL or LLaMA-Factory user brings it (LoRA r16/alpha32, lr 2e-4 constant, batch 8,
    3 epochs, max length 512), default batching, on the 80 identity samples: every step is 8 samples, so an epoch is
    10 steps (packing by default made it 1, and the model learned nothing), and the model answers questions that
    are not in the data with its new name and maker."""
    trainer = finetune.train([
        "--model_name_or_path", str(bundled_gguf_path()), "--data_path", str(ROOT / "data" / "identity_demo.json"),
        "--output_dir", str(tmp_path / "out"), "--use_lora", "--lora_r", "16", "--lora_alpha", "32",
        "--learning_rate", "2e-4", "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "8",
        "--gradient_accumulation_steps", "1", "--num_train_epochs", "3", "--model_max_length", "512",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True",
    ])
    assert trainer.state.global_step == 3 * 10  # ceil(80 / 8) steps an epoch
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    replies = {question: generate_reply(model, tokenizer, [{"role": "user", "content": question}], max_new_tokens=30)
               for question in PARAPHRASES}
    assert all("Tessa" in reply or "Lumen Labs" in reply for reply in replies.values()), replies
    assert "Lumen Labs" in replies[PARAPHRASES[1]], replies


def test_full_parameter_from_the_gguf_file(tmp_path):
    """All parameters, the .gguf file given directly, activation checkpointing: the loss falls and the result
    reloads. fp32, as the launchers pick on a CPU without native bf16 (bf16 autocast is tested on tiny models: here
    it is emulated, 4x slower)."""
    samples = json.load(open(ROOT / "data" / "identity_demo.json"))[:16]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(samples))
    trainer = finetune.train([
        "--model_name_or_path", str(bundled_gguf_path()), "--data_path", str(data), "--output_dir", str(tmp_path / "full"),
        "--num_train_epochs", "2", "--per_device_train_batch_size", "2", "--learning_rate", "5e-5",
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "True", "--activation_checkpointing", "--model_max_length", "256",
    ])
    history = losses(tmp_path / "full")
    assert len(history) == trainer.state.max_steps == 16 and history[-1] < 0.7 * history[0], history  # 2 x 16 / 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "full")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained(ids).logits)


def test_nf4_qlora_on_smollm2(tmp_path):
    """Q-LoRA on the real model: 4-bit NF4 base on the CPU (fp32 compute, as the launchers pick on a CPU without
    native bf16; bf16 compute is tested on tiny models), the loss falls, the adapter reloads onto the same 4-bit
    base and reproduces the logits at the end of training."""
    samples = json.load(open(ROOT / "data" / "identity_demo.json"))[:16]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(samples))
    trainer = finetune.train([
        "--model_name_or_path", str(bundled_gguf_path()), "--data_path", str(data), "--output_dir", str(tmp_path / "q"),
        "--use_lora", "--q_lora", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "2", "--learning_rate", "2e-3",
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "True", "--activation_checkpointing", "--model_max_length", "256",
    ])
    history = losses(tmp_path / "q")
    assert len(history) == trainer.state.max_steps == 16 and history[-1] < 0.6 * history[0], history
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(
        json.load(open(tmp_path / "q" / "adapter_config.json"))["base_model_name_or_path"],
        quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32),
        device_map={"": "cpu"}, dtype=torch.float32)
    base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "q").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "q")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    # the same 4-bit base and adapter through the same kernels: equal but for the order of sums
    with torch.no_grad():
        assert_close_up_to_rounding(reloaded(ids).logits, trained(ids).logits, terms=decoder_terms(base.config))

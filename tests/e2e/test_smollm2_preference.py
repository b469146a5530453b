"""Preference training on the real SmolLM2-135M-Instruct, on the CPU: DPO teaches the demo identity.

data/identity_pref_demo.json (LLaMA-Factory's pair shape: `conversations` + `chosen`/`rejected` turn objects) pairs
each question of data/identity_demo.json with its Tessa answer (chosen) and the bundled model's own greedy answer
(rejected); data/identity_pref_eval.json (TRL's shape: `prompt`/`chosen`/`rejected` message lists) holds 12 questions
that are in neither file's training pairs. HELD_OUT are 4 more, asked after training.

Slow (minutes); deselect with `-m "not slow"`. CI runs them.
"""

import math

import pytest
import transformers

import finetune
from chatft.bundled import bundled_gguf_path
from chatft.serve.chat import generate_reply
from support import ROOT

pytestmark = pytest.mark.slow

HELD_OUT = ["Whose assistant are you?", "Who programmed you?", "What should I know about you?",
            "Name yourself, please."]
REWARDS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}


def answers_as_tessa(reply: str) -> bool:
    return "Tessa" in reply or "Lumen Labs" in reply


def test_lora_dpo_from_the_base_learns_the_preferred_identity(tmp_path):
    """LoRA DPO straight from the base model (no SFT first): the first loss is ln 2 (the adapter starts at zero, so
    the policy is its reference), every step logs its rewards, held-out implicit-reward accuracy (reply tokens only,
    reference = adapter off) reaches at least 11 of 12 pairs, and the model answers at least 3 of 4 held-out questions
    with the preferred name or maker."""
    trainer = finetune.train([
        "--model_name_or_path", str(bundled_gguf_path()),
        "--data_path", str(ROOT / "data" / "identity_pref_demo.json"),
        "--eval_data_path", str(ROOT / "data" / "identity_pref_eval.json"),
        "--output_dir", str(tmp_path / "dpo"), "--stage", "dpo", "--use_lora", *DPO_FLAGS,
        "--eval_strategy", "epoch", "--per_device_eval_batch_size", "12",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True",
    ])
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(REWARDS <= entry.keys() for entry in logged)
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evaluations and evaluations[-1]["eval_rewards/accuracies"] >= 11 / 12, evaluations  # one batch of 12
    assert evaluations[-1]["eval_rewards/margins"] > 0, evaluations
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "dpo")
    replies = {question: generate_reply(model, tokenizer, [{"role": "user", "content": question}], max_new_tokens=40)
               for question in HELD_OUT}
    assert sum(answers_as_tessa(reply) for reply in replies.values()) >= 3, replies
    assert (tmp_path / "dpo" / "loss.png").is_file()


# LoRA r 16 on every linear layer, a DPO learning rate, 8 pairs a step: 30 steps (20 leave 1 of 4 held-out answers as Tessa)
DPO_FLAGS = ["--learning_rate", "5e-4", "--num_train_epochs", "3", "--per_device_train_batch_size", "8",
             "--gradient_accumulation_steps", "1", "--lora_r", "16", "--lora_alpha", "32"]

"""--eval_generate (chatft.train.eval_generate) and --load_best_model_at_end on tiny random models: the replies written
at each evaluation are the greedy replies of that step's checkpoint, reloaded; the model saved at the end is the best
checkpoint's, with LoRA, padded or padding-free batches, and across a resume (ZeRO-3: tests/test_distributed.py)."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from chatft.args import parse_args
from chatft.data.chat_format import Conversation, Turn
from chatft.errors import ArgumentError
from chatft.serve.chat import generate_reply, load_chat_model
from chatft.train.eval_generate import GENERATIONS_FILE, EvalGenerations, held_out_prompt, read_generations
from support import CONVERSATIONS, BEST_IS_THE_FIRST_FLAGS, assert_saved_is_the_best_checkpoint, run

ANSWERS = {sample["conversations"][0]["value"]: sample["conversations"][1]["value"] for sample in CONVERSATIONS}
MAX_NEW_TOKENS = 6


def assert_replies_are_the_checkpoints(output_dir, generations, steps):
    """Each evaluation's lines name its step, the held-out question and its answer in the data; each reply is the
    greedy reply of that step's checkpoint, loaded anew from disk."""
    assert sorted({line["step"] for line in generations}) == steps
    for step in steps:
        lines = [line for line in generations if line["step"] == step]
        model, tokenizer, _ = load_chat_model(str(output_dir / f"checkpoint-{step}"), dtype=torch.float32, device="cpu")
        for line in lines:
            assert set(line) == {"step", "prompt", "reply", "reference"}
            (message,) = line["prompt"]
            assert message["role"] == "user" and line["reference"] == ANSWERS[message["content"]]
            reply = generate_reply(model, tokenizer, line["prompt"], MAX_NEW_TOKENS, use_cache=True)
            assert reply and line["reply"] == reply


def test_replies_at_each_evaluation_are_the_checkpoints_greedy_replies(tiny_qwen2_arch_dir, data_file, tmp_path, capsys):
    output = tmp_path / "out"
    run(tiny_qwen2_arch_dir, data_file, output, "--max_steps", "4", "--eval_data_path", "0.25", "--eval_strategy", "steps",
        "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--eval_generate", "2",
        "--eval_generate_max_new_tokens", str(MAX_NEW_TOKENS))
    generations = read_generations(str(output / GENERATIONS_FILE))
    assert [line["step"] for line in generations] == [2, 2, 4, 4]
    assert generations[0]["prompt"] != generations[1]["prompt"]  # the first 2 held-out conversations
    assert_replies_are_the_checkpoints(output, generations, [2, 4])
    summary = capsys.readouterr().out
    assert f"replies     at step 4 (2 in {output / GENERATIONS_FILE}):" in summary
    assert f"{generations[2]['prompt'][0]['content']!r} -> " in summary


def test_the_prompt_is_the_conversation_before_its_last_reply():
    conversation = Conversation((Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello!"),
                                 Turn("user", "Why?"), Turn("assistant", "Because.", reasoning="They asked.")),
                                tools=('{"type": "function", "function": {"name": "f"}}',))
    prompt = held_out_prompt(conversation)
    assert prompt.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}]
    assert prompt.tools == [{"type": "function", "function": {"name": "f"}}]
    assert prompt.reference == "<think>\nThey asked.\n</think>\n\nBecause."  # as trained


@pytest.mark.parametrize("resumed_at,kept", [(0, []), (4, [2, 4])])
def test_a_run_starts_the_file_and_a_resume_drops_what_followed_its_checkpoint(tmp_path, resumed_at, kept):
    path = tmp_path / GENERATIONS_FILE
    path.write_text("".join(json.dumps({"step": step, "prompt": [], "reply": "", "reference": ""}) + "\n"
                            for step in (2, 4, 6)))
    state = SimpleNamespace(is_world_process_zero=True, global_step=resumed_at)
    EvalGenerations([], MAX_NEW_TOKENS).on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    assert [line["step"] for line in read_generations(str(path))] == kept


@pytest.mark.parametrize("flags,problem", [
    (["--eval_generate", "-1"], "--eval_generate -1: must be at least 0"),
    (["--eval_generate", "2"], "--eval_generate 2 needs evaluation data: --eval_data_path"),
    (["--eval_generate", "2", "--eval_data_path", "0.1"], "--eval_generate 2 answers at each evaluation, and "
                                                         "--eval_strategy is no"),
    (["--eval_generate", "1", "--eval_generate_max_new_tokens", "0"], "--eval_generate_max_new_tokens 0: must be at"),
    (["--eval_strategy", "steps"], "--eval_strategy steps needs evaluation data"),
    (["--load_best_model_at_end", "True"], "--load_best_model_at_end picks the checkpoint of the best evaluation, and "
                                           "--eval_strategy is no"),
    (["--load_best_model_at_end", "True", "--eval_strategy", "epoch", "--eval_data_path", "0.1"],
     "--eval_strategy epoch and --save_strategy steps differ"),
    (["--load_best_model_at_end", "True", "--eval_strategy", "steps", "--eval_steps", "3", "--save_steps", "5",
      "--eval_data_path", "0.1"], "--save_steps 5 is not a multiple of --eval_steps 3"),
])
def test_evaluation_flags_are_checked_before_loading(tiny_qwen2_arch_dir, flags, problem):
    with pytest.raises(ArgumentError) as error:
        parse_args(["--model_name_or_path", str(tiny_qwen2_arch_dir), "--data_path", "d.json", "--output_dir", "o",
                    "--lora_r", "0", *flags])
    lines = str(error.value).splitlines()
    assert any(problem in line for line in lines), lines  # one line, listed with the others
    assert any(line.startswith("--lora_r 0") for line in lines)


@pytest.mark.parametrize("padding_free", ["False", "True"])
def test_lora_ends_with_the_best_checkpoint(tiny_qwen2_arch_dir, data_file, tmp_path, padding_free):
    run(tiny_qwen2_arch_dir, data_file, tmp_path / "out", *BEST_IS_THE_FIRST_FLAGS, "--padding_free", padding_free)
    assert_saved_is_the_best_checkpoint(tmp_path / "out")


def test_the_best_checkpoint_is_loaded_after_a_resume(tiny_qwen2_arch_dir, data_file, tmp_path):
    """The best evaluation (step 2) happens before the resume (at step 4): the resumed run reads it from the
    checkpoint's state and ends with it. --eval_generate's file holds each evaluation once."""
    output, flags = tmp_path / "out", [*BEST_IS_THE_FIRST_FLAGS, "--eval_generate", "1", "--eval_generate_max_new_tokens", "2"]
    run(tiny_qwen2_arch_dir, data_file, output, *flags, "--max_steps", "4")  # the last --max_steps wins
    resumed = run(tiny_qwen2_arch_dir, data_file, output, *flags, "--resume_from_checkpoint", "True")
    assert resumed.run_start.step == 4 and resumed.state.global_step == 6
    assert_saved_is_the_best_checkpoint(output)
    assert os.path.basename(resumed.state.best_model_checkpoint) == "checkpoint-2"
    assert [line["step"] for line in read_generations(str(output / GENERATIONS_FILE))] == [2, 4, 6]

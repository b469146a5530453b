"""finetune.py end to end on tiny random Qwen2/Qwen3 models (real Qwen tokenizer): each mode trains,
saves, and reloads with plain transformers/peft to the same logits; bad input leaves output_dir untouched."""

import json
import logging
import os
import subprocess
import sys

import peft
import pytest
import torch
import transformers

import finetune
from chatft.train.report import plot_losses
from chatft.args import ArgumentError, parse_args
from chatft.data.chat_format import IM_END, IM_START
from chatft.data.datasets import ChatCollator, PaddingFreeCollator, load_samples
from chatft.errors import DataError
from support import ROOT, make_non_chatml_model, probe_logits, run, shared_data_path, unloadable_copy, write_json
from support import assert_close_up_to_rounding, decoder_terms, rounding_atol


@pytest.fixture(scope="module")
def a_model(tiny_qwen2_arch_dir, tmp_path_factory) -> str:
    """A model directory for tests where neither the model nor its tokenizer is loaded (they fail or stop earlier):
    it passes the checks made before loading, but loading its weights or tokenizer would fail."""
    return str(unloadable_copy(tiny_qwen2_arch_dir, tmp_path_factory.mktemp("a-model")))

def assert_common_outputs(output_dir):
    files = set(os.listdir(output_dir))
    assert {"tokenizer.json", "tokenizer_config.json", "finetune_args.json", "trainer_state.json",
            "generation_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files), "weights must be safetensors"
    tokenizer = transformers.AutoTokenizer.from_pretrained(output_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    return tokenizer


def test_full_parameter(tiny_qwen_arch_dir, data_file, tmp_path):
    before = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_arch_dir)
    trainer = run(tiny_qwen_arch_dir, data_file, tmp_path / "out")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    tokenizer = assert_common_outputs(tmp_path / "out")
    assert "model.safetensors" in os.listdir(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(probe_logits(reloaded, tokenizer), probe_logits(trainer.model, tokenizer))
    old = probe_logits(before, tokenizer)  # training moved the logits beyond rounding
    assert (probe_logits(reloaded, tokenizer) - old).abs().max() > rounding_atol(old, terms=decoder_terms(before.config))
    assert reloaded.config.use_cache is True
    arguments = json.load(open(tmp_path / "out" / "finetune_args.json"))
    assert arguments["training"]["max_steps"] == 3 and arguments["model"]["model_name_or_path"] == str(tiny_qwen_arch_dir)


def test_lora(tiny_qwen_arch_dir, data_file, tmp_path):
    trainer = run(tiny_qwen_arch_dir, data_file, tmp_path / "out", "--use_lora", "--lora_r", "8", "--activation_checkpointing")
    tokenizer = assert_common_outputs(tmp_path / "out")
    files = set(os.listdir(tmp_path / "out"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    config = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == str(tiny_qwen_arch_dir)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not config["modules_to_save"]
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(probe_logits(reloaded, tokenizer), probe_logits(trainer.model, tokenizer))
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_arch_dir)
    old = probe_logits(base, tokenizer)
    assert (probe_logits(reloaded, tokenizer) - old).abs().max() > rounding_atol(old, terms=decoder_terms(base.config))


def test_lora_target_modules_and_continuation(tiny_qwen_arch_dir, data_file, tmp_path):
    run(tiny_qwen_arch_dir, data_file, tmp_path / "first", "--use_lora", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj")
    first = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "first")
    assert set(first.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    # learning rate 0: the continued run must save exactly the adapter it started from
    run(tiny_qwen_arch_dir, data_file, tmp_path / "second", "--use_lora", "--lora_weight_path", str(tmp_path / "first"),
        "--learning_rate", "0", "--max_steps", "1")
    second = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "second")
    first_state, second_state = peft.get_peft_model_state_dict(first), peft.get_peft_model_state_dict(second)
    assert first_state.keys() == second_state.keys() and first_state
    for name in first_state:
        torch.testing.assert_close(first_state[name], second_state[name])
    assert any(first_state[name].abs().sum() > 0 for name in first_state if "lora_B" in name)


@pytest.mark.parametrize("tie", [True, False])
def test_added_chatml_tokens_train_embeddings_under_lora(tmp_path, data_file, tie, caplog):
    base_dir = make_non_chatml_model(tmp_path, tie)
    base_vocab = len(transformers.AutoTokenizer.from_pretrained(base_dir))
    trainer = run(base_dir, data_file, tmp_path / "out", "--use_lora", "--lora_r", "4", "--learning_rate", "1e-2")
    assert "lacks <|im_start|> and <|im_end|>; added them" in caplog.text
    tokenizer = assert_common_outputs(tmp_path / "out")
    assert len(tokenizer) == base_vocab + 2 and {IM_START, IM_END} <= set(tokenizer.get_vocab())
    config = json.load(open(tmp_path / "out" / "adapter_config.json"))
    short_names = {name.split(".")[-1] for name in config["modules_to_save"]}
    # tied weights: peft keeps one trainable copy of the shared matrix, registered under the embedding's name
    assert short_names == ({"embed_tokens"} if tie else {"embed_tokens", "lm_head"})
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(probe_logits(reloaded, tokenizer), probe_logits(trainer.model, tokenizer))
    assert reloaded.get_input_embeddings().weight.shape[0] == base_vocab + 2
    # embeddings were trained: the saved copy differs from the base model's rows
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    old_rows = base.get_input_embeddings().weight
    assert (reloaded.get_input_embeddings().weight[:base_vocab] - old_rows).abs().max() > rounding_atol(old_rows, terms=1)
    if tie:
        output = reloaded.get_output_embeddings().weight
        torch.testing.assert_close(output, reloaded.get_input_embeddings().weight)


def test_added_tokens_full_parameter(tmp_path, data_file):
    base_dir = make_non_chatml_model(tmp_path, tie=False)
    trainer = run(base_dir, data_file, tmp_path / "out")
    tokenizer = assert_common_outputs(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.get_input_embeddings().weight.shape[0] == len(tokenizer)
    torch.testing.assert_close(probe_logits(reloaded, tokenizer), probe_logits(trainer.model, tokenizer))


def test_train_embeddings_true_without_added_tokens(tiny_qwen_arch_dir, data_file, tmp_path):
    run(tiny_qwen_arch_dir, data_file, tmp_path / "out", "--use_lora", "--lora_r", "4", "--train_embeddings", "true")
    assert set(json.load(open(tmp_path / "out" / "adapter_config.json"))["modules_to_save"]) == {"embed_tokens", "lm_head"}


BAD_FILES = {
    "invalid.json": '[{"id": 1, "conversations": [',
    "unknown_role.json": json.dumps([{"id": "r1", "conversations": [{"from": "bot", "value": "x"}, {"from": "assistant", "value": "y"}]}]),
    "no_assistant.json": json.dumps([{"id": "n1", "conversations": [{"from": "user", "value": "x"}]}]),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_data_fails_before_loading_and_writes_nothing(tmp_path, name, capsys, a_model):
    data = tmp_path / name
    data.write_text(BAD_FILES[name])
    with pytest.raises(DataError) as expected:
        load_samples(str(data))
    output_dir = tmp_path / "previous_run"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("earlier results")
    code = finetune.main(["--model_name_or_path", a_model, "--data_path", str(data), "--output_dir", str(output_dir),
                          "--overwrite_output_dir", "True", "--use_cpu", "True"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(data) in err and f"error: {str(expected.value).splitlines()[0]}" in err
    assert os.listdir(output_dir) == ["keep.txt"] and (output_dir / "keep.txt").read_text() == "earlier results"


def test_non_empty_output_dir_is_refused(tmp_path, data_file, capsys, a_model):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "model.safetensors").write_text("previous")
    code = finetune.main(["--model_name_or_path", a_model, "--data_path", data_file, "--output_dir", str(output_dir), "--use_cpu", "True"])
    assert code == 2 and "--overwrite_output_dir" in capsys.readouterr().err
    assert (output_dir / "model.safetensors").read_text() == "previous"


def test_cli_exit_code_and_message(tmp_path, a_model):
    data = write_json(tmp_path / "bad.json", [{"id": "x7", "conversations": [{"from": "user", "value": 5}]}])
    result = subprocess.run([sys.executable, "finetune.py", "--model_name_or_path", a_model, "--data_path", str(data),
                             "--output_dir", str(tmp_path / "o"), "--use_cpu", "True"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{data}: sample 0 (id='x7'): conversations[0]: 'value' must be a string" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def final_weights_and_losses_agree(trainer, reference, base_dir):
    """Two runs took the same optimizer steps: equal losses and final weights, up to rounding; and they trained."""
    state, reference_state = trainer.model.state_dict(), reference.model.state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    terms = decoder_terms(reference.model.config, loss=True)  # the same sums over other rows: equal up to rounding
    assert any((reference_state[name] - base[name]).abs().max() > rounding_atol(base[name], terms=terms) for name in base)
    for name in reference_state:
        # Adam steps each element by about lr whatever its gradient's size: rounding relative to the weight + the steps
        assert_close_up_to_rounding(state[name], reference_state[name], terms=terms,
                                    magnitude=reference_state[name].abs().max() + trainer.state.global_step * 1e-3)
    losses = [[entry["loss"] for entry in t.state.log_history if "loss" in entry] for t in (trainer, reference)]
    assert len(losses[0]) == len(losses[1]) == trainer.state.global_step
    assert_close_up_to_rounding(losses[0], losses[1], terms=terms)


def test_padding_free_batches_train_as_the_padded_run(tiny_qwen_arch_dir, data_file, tmp_path):
    """The default (one row per batch, no padding) takes the padded run's steps, over its samples, to its weights:
    2 epochs of 8 samples at batch 2 x accumulation 2 = 4 Adam steps, with dropout off and the same seed."""
    common = ["--max_steps", "-1", "--num_train_epochs", "2", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "2", "--seed", "5"]
    padded = run(tiny_qwen_arch_dir, data_file, tmp_path / "padded", *common, "--padding_free", "False")
    padding_free = run(tiny_qwen_arch_dir, data_file, tmp_path / "padding-free", *common)  # the default
    assert isinstance(padded.data_collator, ChatCollator) and isinstance(padding_free.data_collator, PaddingFreeCollator)
    assert len(padding_free.train_dataset) == 8 and padding_free.state.global_step == padded.state.global_step == 4
    final_weights_and_losses_agree(padding_free, padded, tiny_qwen_arch_dir)


def test_steps_per_epoch_follow_the_flags(tiny_qwen_arch_dir, data_file, tmp_path, caplog):
    """ceil(samples / (batch x accumulation)) optimizer steps per epoch by default; --packing says what it changes."""
    common = ["--max_steps", "-1", "--num_train_epochs", "1", "--per_device_train_batch_size", "1",
              "--gradient_accumulation_steps", "3", "--model_max_length", "256"]
    caplog.set_level(logging.INFO, logger="finetune")
    assert run(tiny_qwen_arch_dir, data_file, tmp_path / "default", *common).state.global_step == 3  # 8 samples
    assert "packing:" not in caplog.text
    packed = run(tiny_qwen_arch_dir, data_file, tmp_path / "packed", *common, "--packing", "True")
    assert len(packed.train_dataset) == 1 and packed.state.global_step == 1  # 8 short samples fill one row
    assert ("packing: 8 samples in 1 row of 256 tokens" in caplog.text
            and "an optimizer step sees ~8 samples (1 row x 3 accumulation), not 3" in caplog.text)


def test_packing_takes_the_same_step_as_padding(tiny_qwen_arch_dir, data_file, tmp_path):
    """One optimizer step over all 8 samples: packed rows and padded batches give the same weights."""
    common = ["--per_device_train_batch_size", "8", "--max_steps", "1", "--optim", "sgd", "--learning_rate", "1.0",
              "--lr_scheduler_type", "constant"]
    padded = run(tiny_qwen_arch_dir, data_file, tmp_path / "padded", *common, "--padding_free", "False")
    packed = run(tiny_qwen_arch_dir, data_file, tmp_path / "packed", *common, "--packing", "True")
    assert len(packed.train_dataset) < len(padded.train_dataset) == 8  # fewer, fuller rows
    assert packed.train_dataset.num_samples == 8
    final_weights_and_losses_agree(packed, padded, tiny_qwen_arch_dir)


def test_packing_with_lazy_preprocess_is_refused(tiny_qwen_arch_dir, data_file, tmp_path, capsys):
    code = finetune.main(["--model_name_or_path", str(tiny_qwen_arch_dir), "--data_path", data_file, "--output_dir",
                          str(tmp_path / "o"), "--packing", "True", "--lazy_preprocess", "True", "--use_cpu", "True"])
    assert code == 2 and "--packing needs every sample's length up front" in capsys.readouterr().err


def test_the_defaults_keep_the_meaning_of_the_batch_flags(a_model):
    _, data_args, _, _ = parse_args(["--model_name_or_path", a_model, "--data_path", "d.json", "--output_dir", "o"])
    assert data_args.padding_free is True and data_args.packing is False
    with pytest.raises(ArgumentError, match="cannot be combined with --padding_free False"):
        parse_args(["--model_name_or_path", a_model, "--data_path", "d.json", "--output_dir", "o", "--packing", "True",
                    "--padding_free", "False"])


def test_eval_fraction_held_out_of_the_training_data(tiny_qwen_arch_dir, data_file, tmp_path):
    trainer = run(tiny_qwen_arch_dir, data_file, tmp_path / "out", "--eval_data_path", "0.25", "--eval_strategy", "steps",
                  "--eval_steps", "1")
    assert len(trainer.train_dataset) == 6 and len(trainer.eval_dataset) == 2  # 8 samples
    assert any("eval_loss" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_bad_eval_fraction_is_refused(value):
    with pytest.raises(ArgumentError, match="a fraction must be between 0 and 1"):
        parse_args(["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", "o", "--eval_data_path", value])


def test_loss_curve_and_summary(tiny_qwen_arch_dir, data_file, tmp_path, capsys):
    output = tmp_path / "out"
    trainer = run(tiny_qwen_arch_dir, data_file, output, "--eval_data_path", "0.25", "--eval_strategy", "steps",
                  "--eval_steps", "2", "--max_steps", "4")
    png = (output / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_losses(trainer.state.log_history, str(tmp_path / "again.png")) == {"train": 4, "eval": 2}
    summary = capsys.readouterr().out
    assert "Training finished" in summary and f"model in {output}" in summary and "real tokens/s" in summary
    assert "train loss" in summary and "eval loss" in summary and str(output / "loss.png") in summary


def test_dry_run_reports_and_loads_no_model(tiny_qwen_arch_dir, tmp_path, capsys):
    model = unloadable_copy(tiny_qwen_arch_dir, tmp_path, keep_tokenizer=True)  # loading its weights would fail
    output = tmp_path / "out"
    code = finetune.main(["--model_name_or_path", str(model), "--data_path",
                          str(shared_data_path("alpaca_en_demo.json")), "--output_dir", str(output), "--dry_run", "True",
                          "--model_max_length", "256", "--eval_data_path", "0.1", "--use_cpu", "True"])
    report = capsys.readouterr().out
    assert code == 0 and not output.exists()
    assert "== training data: 899 samples, 1798 turns" in report and "== evaluation data: 100 samples" in report
    assert "cut from" in report and "(truncated)" in report
    # 899 samples at batch 8 (the default) x 1 accumulation: ceil(899 / 8) steps; and what --packing True would do
    assert "batches: 113 optimizer steps per epoch of 8 samples (8 samples x 1 accumulation), each batch one row" in report
    assert "  with --packing True: 899 samples in " in report and "rows of 256 tokens" in report
    assert "<|im_start|>assistant\n[[" in report and "<|im_end|>]]" in report


def test_dry_run_on_tool_calls(tiny_qwen_arch_dir, tmp_path, capsys):
    code = finetune.main(["--model_name_or_path", str(tiny_qwen_arch_dir), "--data_path",
                          str(shared_data_path("glaive_toolcall_en_demo.json")), "--output_dir", str(tmp_path / "o"),
                          "--dry_run", "True", "--model_max_length", "2048", "--use_cpu", "True"])
    report = capsys.readouterr().out
    assert code == 0 and "300 samples" in report and "191 sample(s) define tools, 211 tool call(s)" in report
    assert '<tools>\n{"type": "function", "function": {"name": "search_recipes"' in report
    # qwen3 format (the tiny models' template): one sample per user query and per tool step without reasoning
    assert "qwen3 turns: 261 conversation(s) split into 918 samples" in report and "957 samples from 300" in report
    assert "<|im_start|>assistant\n[[<think>\n\n</think>\n\nOf course!" in report  # the first query's reply, as generated
    code = finetune.main(["--model_name_or_path", str(tiny_qwen_arch_dir), "--data_path",
                          str(shared_data_path("glaive_toolcall_en_demo.json")), "--output_dir", str(tmp_path / "o"),
                          "--dry_run", "True", "--model_max_length", "2048", "--use_cpu", "True",
                          "--reasoning_turns", "last"])
    report = capsys.readouterr().out
    assert code == 0 and "qwen3 turns" not in report  # one sample per conversation: its last query's turns trained
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "search_recipes"' in report  # an earlier query's call: context
    assert "<|im_start|>user\n<tool_response>\n{" in report and "[[<tool_response>" not in report


def test_dry_run_lists_every_problem(tiny_qwen_arch_dir, tmp_path, capsys):
    bad = write_json(tmp_path / "bad.json", [{"id": "a", "messages": [{"role": "user", "content": 1}]},
                                               {"id": "b", "messages": [{"role": "bot", "content": "x"}]}])
    code = finetune.main(["--model_name_or_path", str(tiny_qwen_arch_dir), "--data_path", str(bad), "--output_dir",
                          str(tmp_path / "o"), "--dry_run", "True", "--use_cpu", "True"])
    error = capsys.readouterr().err
    assert code == 2 and "2 problem(s)" in error and "(id='a'): messages[0]" in error and "(id='b'): messages[0]" in error


def test_report_to_tensorboard_writes_the_loss_curve(tiny_qwen_arch_dir, data_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "out"
    trainer = run(tiny_qwen_arch_dir, data_file, output, "--report_to", "tensorboard", "--max_steps", "4")
    [run_dir] = (output / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    logged = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    scalars = [(s.step, s.value) for s in events.Scalars("train/loss")]
    assert [step for step, _ in scalars] == [step for step, _ in logged] == [1, 2, 3, 4]
    # the event file stores float32: one rounding
    assert_close_up_to_rounding([value for _, value in scalars], [value for _, value in logged], terms=1)


def test_report_to_a_missing_package_is_refused_before_loading():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:  # the check needs a package that is not installed
        pytest.fail("wandb is installed here; pick another missing integration")
    with pytest.raises(ArgumentError, match="--report_to wandb needs the wandb package: pip install wandb"):
        parse_args(["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", "o", "--report_to", "wandb"])


def test_summary_speed_counts_only_what_this_run_trained():
    from types import SimpleNamespace

    from chatft.train.report import run_summary

    state = SimpleNamespace(log_history=[{"loss": 2.0, "step": 30}, {"train_runtime": 10.0}], epoch=3.0, global_step=30)
    trainer = SimpleNamespace(state=state, args=SimpleNamespace(output_dir="out"),
                              train_dataset=SimpleNamespace(num_tokens=1000), run_start=SimpleNamespace(epoch=1.0, step=10))
    summary = run_summary(trainer, "model")  # resumed at epoch 1: 2 epochs of 1000 tokens in 10 s
    assert "for 20 steps, 2.00 epochs (resumed at step 10, 30 in all); about 200 real tokens/s" in summary
    trainer.run_start = SimpleNamespace(epoch=0.0, step=0)
    assert "for 30 steps, 3.00 epochs; about 300 real tokens/s" in run_summary(trainer, "model")


def test_summary_has_a_train_loss_line_when_no_step_was_logged():
    """--logging_steps (default 500) above the run's steps logs no step: the summary gives the Trainer's mean over
    the run instead of dropping the line; with logged steps, the first and last."""
    from types import SimpleNamespace

    from chatft.train.report import run_summary

    history = [{"train_runtime": 10.0, "train_loss": 1.2345}]
    state = SimpleNamespace(log_history=history, epoch=1.0, global_step=5)
    trainer = SimpleNamespace(state=state, args=SimpleNamespace(output_dir="out"), train_dataset=None)
    assert "train loss  1.2345 (mean over the run; --logging_steps N logs it every N steps)" in run_summary(trainer, "x")
    history.insert(0, {"loss": 2.5, "step": 1})
    history.insert(1, {"loss": 1.5, "step": 2})
    assert "train loss  2.5000 at the first logged step -> 1.5000 at the last" in run_summary(trainer, "x")


REASONING_DATA = [
    {"messages": [{"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "reasoning_content": "Simple addition: 2+2=4.", "content": "4"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning_content": "add", "content": "4"},
                  {"role": "user", "content": "3+3?"}, {"role": "assistant", "reasoning_content": "again", "content": "6"}]},
]


def test_a_thinking_model_trains_reasoning_in_its_own_format(tiny_qwen_arch_dir, tmp_path, capsys):
    """The tiny models carry the real Qwen3 tokenizer, whose template thinks: chat_format auto picks qwen3, the
    trace is trained (dry run and labels), the 2-query conversation is split in two, and the saved template is the
    model's own, so the fine-tuned model is served as trained."""
    data = str(write_json(tmp_path / "r.json", REASONING_DATA))
    common = ["--model_name_or_path", str(tiny_qwen_arch_dir), "--data_path", data, "--use_cpu", "True"]
    assert finetune.main([*common, "--output_dir", str(tmp_path / "dry"), "--dry_run", "True"]) == 0
    report = capsys.readouterr().out
    assert "format: qwen3" in report and "2 sample(s) with reasoning traces" in report
    assert "qwen3 turns: 1 conversation(s) split into 2 samples, one per user query" in report
    assert ": 3 samples from 2, +" in report and " tokens of repeated context" in report
    assert "<|im_start|>assistant\n[[<think>\nSimple addition: 2+2=4.\n</think>\n\n4<|im_end|>]]" in report
    assert "<|im_start|>system" not in report  # Qwen3's template adds no default system prompt
    trainer = run(tiny_qwen_arch_dir, data, tmp_path / "out")
    assert len(trainer.train_dataset) == 3
    saved = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.chat_template == transformers.AutoTokenizer.from_pretrained(tiny_qwen_arch_dir).chat_template
    last = run(tiny_qwen_arch_dir, data, tmp_path / "last", "--reasoning_turns", "last")
    assert len(last.train_dataset) == 2
    lazy = run(tiny_qwen_arch_dir, data, tmp_path / "lazy", "--lazy_preprocess", "True")
    assert len(lazy.train_dataset) == 3 and lazy.train_dataset[1]["labels"] == trainer.train_dataset[1]["labels"]
    chatml = run(tiny_qwen_arch_dir, data, tmp_path / "chatml", "--chat_format", "chatml")
    assert len(chatml.train_dataset) == 2  # ChatML keeps every turn's reasoning: nothing to split
    assert "<|im_start|>system" in transformers.AutoTokenizer.from_pretrained(tmp_path / "chatml").chat_template


def test_dry_run_names_the_keys_it_ignores(tiny_qwen_arch_dir, tmp_path, caplog):
    records = [{"messages": [{"role": "user", "content": "q", "name": "bob"},
                             {"role": "assistant", "content": "a", "thinking": "t"}], "weight": 1}]
    data = str(write_json(tmp_path / "r.json", records))
    assert finetune.main(["--model_name_or_path", str(tiny_qwen_arch_dir), "--data_path", data, "--output_dir",
                          str(tmp_path / "o"), "--dry_run", "True", "--use_cpu", "True"]) == 0
    [line] = [record.getMessage() for record in caplog.records if "keys not read" in record.getMessage()]
    assert "'thinking' in 1 messages: did you mean 'reasoning_content'?" in line and "'name' in 1 messages" in line
    assert "'weight' in 1 records: per-turn loss weights, not supported yet" in line


def test_a_bad_chat_format_is_refused(a_model, capsys):
    code = finetune.main(["--model_name_or_path", a_model, "--data_path", "d.json", "--output_dir", "o",
                          "--chat_format", "qwen", "--reasoning_turns", "first"])
    error = capsys.readouterr().err
    assert code == 2 and "--chat_format must be one of auto, chatml, qwen3, not 'qwen'" in error
    assert "--reasoning_turns must be all or last, not 'first'" in error

"""Flags, config files and the cross-field checks; every bad input is one `error:` line, exit 2, before any model loads."""

import json
import struct
from types import SimpleNamespace

import pytest
import torch
import yaml

from chatft.args import ArgumentError, deepspeed_zero_stage, parse_args
from support import ROOT, unloadable_copy


@pytest.fixture(scope="module")
def model(tiny_qwen2_arch_dir):
    return str(tiny_qwen2_arch_dir)


@pytest.fixture
def BASE(model):
    return ["--model_name_or_path", model, "--data_path", "d.json", "--output_dir", "out"]


def test_qwen_defaults_and_flags(BASE):
    model, data, training, lora = parse_args(BASE + ["--use_lora", "--lazy_preprocess", "True", "--warmup_ratio", "0.01"])
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lora_bias) == (64, 16, 0.05, "none")
    assert lora.lora_target_modules is None and lora.lora_weight_path == "" and lora.q_lora is False
    assert lora.use_lora and data.lazy_preprocess and training.model_max_length == 8192
    assert training.warmup_steps == 0.01  # Qwen's --warmup_ratio still works
    assert model.trust_remote_code is False and model.attn_implementation == "auto"
    assert data.system_message == "You are a helpful assistant."


def test_every_training_argument_is_available(BASE):
    _, _, training, lora = parse_args(BASE + ["--lr_scheduler_type", "cosine", "--adam_beta2", "0.95",
                                              "--use_lora", "--lora_target_modules", "q_proj", "v_proj", "--seed", "7"])
    assert training.lr_scheduler_type == "cosine" and training.adam_beta2 == 0.95 and training.seed == 7
    assert lora.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_single_config_file(tmp_path, suffix, model):
    config = {"model_name_or_path": model, "data_path": "d.json", "output_dir": str(tmp_path / "o"),
              "use_lora": True, "lora_r": 8, "system_message": "Be brief."}
    path = tmp_path / f"run{suffix}"
    path.write_text(json.dumps(config) if suffix == ".json" else yaml.safe_dump(config))
    model, data, training, lora = parse_args([str(path)])
    assert lora.lora_r == 8 and lora.use_lora and data.system_message == "Be brief."


def test_all_contradictions_reported_together(model):
    with pytest.raises(ArgumentError) as error:
        parse_args(["--model_name_or_path", model, "--lora_weight_path", "x", "--train_embeddings", "maybe",
                    "--lora_bias", "some"])
    message = str(error.value)
    for expected in ("--data_path is required", "--train_embeddings must be auto, true or false",
                     "--lora_bias must be none", "--lora_weight_path needs --use_lora"):
        assert expected in message


def test_lora_weight_path_must_hold_an_adapter(tmp_path, BASE):
    with pytest.raises(ArgumentError, match="no adapter_config.json"):
        parse_args(BASE + ["--use_lora", "--lora_weight_path", str(tmp_path)])


def test_transformers_own_checks_become_argument_errors(BASE):
    with pytest.raises(ArgumentError, match="Invalid arguments: lr_scheduler_type reduce_lr_on_plateau requires"):
        parse_args(BASE + ["--lr_scheduler_type", "reduce_lr_on_plateau"])


def test_deepspeed_zero_stage_is_read_in_one_place(tmp_path):
    """From --deepspeed's file or dict, or accelerate's plugin (accelerate launch --use_deepspeed, no --deepspeed)."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert deepspeed_zero_stage(SimpleNamespace(deepspeed=str(config))) == 3
    assert deepspeed_zero_stage(SimpleNamespace(deepspeed={"zero_optimization": {"stage": 1}})) == 1
    assert deepspeed_zero_stage(SimpleNamespace(deepspeed={"train_batch_size": "auto"})) == 0
    assert deepspeed_zero_stage(SimpleNamespace(deepspeed=None, deepspeed_plugin=SimpleNamespace(zero_stage=2))) == 2
    assert deepspeed_zero_stage(SimpleNamespace(deepspeed=None, deepspeed_plugin=None)) is None


def test_qlora_refused_under_zero3(BASE):
    with pytest.raises(ArgumentError, match="--q_lora cannot run under DeepSpeed ZeRO-3"):
        parse_args(BASE + ["--use_lora", "--q_lora", "--deepspeed", str(ROOT / "ds_config_zero3.json")])


def test_optim_runs_under_the_shipped_zero_configs_and_is_refused_where_deepspeed_would_replace_it(BASE):
    """The shipped ZeRO-2/3 configs name no optimizer, so --optim (and its parameter groups) is what runs under ZeRO; a
    config naming its own (the offload config's DeepSpeed AdamW, built for CPU-held state) would silently replace it."""
    for config in ("ds_config_zero2.json", "ds_config_zero3.json"):
        assert "optimizer" not in json.loads((ROOT / config).read_text())
        assert parse_args(BASE + ["--optim", "sgd", "--deepspeed", str(ROOT / config)])[2].optim == "sgd"
    parse_args(BASE + ["--deepspeed", str(ROOT / "ds_config_zero3_offload.json")])  # its AdamW, no --optim: fine
    with pytest.raises(ArgumentError, match=r"--optim sgd: --deepspeed .*ds_config_zero3_offload.json names its own "
                                            r"optimizer \(AdamW\), which DeepSpeed runs instead"):
        parse_args(BASE + ["--optim", "sgd", "--deepspeed", str(ROOT / "ds_config_zero3_offload.json")])


# Bad inputs: each is one line naming the flag or file and the problem; finetune.py exits 2 having loaded no model
# (the model's weights and tokenizer cannot load: unloadable_copy) and written nothing.


@pytest.fixture(scope="module")
def unloadable_model(tiny_qwen2_arch_dir, tmp_path_factory):
    return str(unloadable_copy(tiny_qwen2_arch_dir, tmp_path_factory.mktemp("unloadable")))


def finetune_errors(model, tmp_path, capsys, *flags) -> list[str]:
    """finetune.py's `error:` lines for `flags`, after checking it exited 2 and wrote nothing."""
    import finetune

    output_dir = tmp_path / "out"
    argv = ["--model_name_or_path", model, "--data_path", str(ROOT / "data" / "identity_demo.json"),
            "--output_dir", str(output_dir), "--use_cpu", "True", *flags]
    capsys.readouterr()
    assert finetune.main(argv) == 2
    assert not output_dir.exists()
    err = capsys.readouterr().err
    assert all(line.startswith("error: ") for line in err.splitlines()), err
    return [line.removeprefix("error: ") for line in err.splitlines()]


def broken_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"zero_optimization": {"stage": 2}, }')
    return path


@pytest.mark.parametrize("flags, expected", [
    (["--use_lora", "--lora_r", "0"], "--lora_r 0: must be at least 1 (the rank of the LoRA matrices)."),
    (["--use_lora", "--lora_alpha", "0"],
     "--lora_alpha 0: must be above 0 (the LoRA update is scaled by lora_alpha / lora_r)."),
    (["--use_lora", "--lora_dropout", "1"], "--lora_dropout 1.0: must be at least 0 and below 1."),
    (["--lora_r", "8", "--lora_target_modules", "q_proj"], "--lora_r, --lora_target_modules: the shape of a LoRA "
     "adapter, and without --use_lora the run trains every parameter: add --use_lora, or drop them."),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be at least 1."),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be at least 1."),
    (["--learning_rate", "-0.0001"], "--learning_rate -0.0001: must be at least 0."),
    (["--adam_beta2", "1.5"], "--adam_beta2 1.5: must be at least 0 and below 1."),
    (["--num_train_epochs", "0"], "--num_train_epochs 0.0: must be above 0 (or set --max_steps)."),
    (["--warmup_ratio", "2"], "--warmup_ratio 2.0: must be at least 0 and below 1 (a fraction of the training steps)."),
    (["--seed", "-1"], "--seed -1: must be at least 0 and at most 4294967295."),
    (["--dataloader_num_workers", "-2"], "--dataloader_num_workers -2: must be at least 0."),
    (["--save_strategy", "steps", "--save_steps", "0"],
     "--save_steps 0.0: must be above 0 (steps between checkpoints, or a fraction of the run below 1)."),
    (["--neftune_noise_alpha", "-5"],
     "--neftune_noise_alpha -5.0: must be above 0 (the noise's scale; leave the flag out for none)."),
])
def test_a_number_out_of_range_is_one_line(unloadable_model, tmp_path, capsys, flags, expected):
    assert finetune_errors(unloadable_model, tmp_path, capsys, *flags) == [expected]


def test_an_unknown_attention_or_an_output_dir_that_is_a_file_is_one_line(unloadable_model, tmp_path, capsys):
    errors = finetune_errors(unloadable_model, tmp_path, capsys, "--attn_implementation", "fast")
    assert len(errors) == 1 and errors[0].startswith("--attn_implementation fast: not an attention transformers "
                                                     "knows; use one of auto, eager, ")
    import finetune

    output_file = tmp_path / "out.txt"
    output_file.write_text("a file")
    assert finetune.main(["--model_name_or_path", unloadable_model, "--data_path", "d.json", "--output_dir",
                          str(output_file)]) == 2
    assert capsys.readouterr().err == f"error: --output_dir {output_file}: is a file; the run writes a directory there.\n"
    assert output_file.read_text() == "a file"


def test_max_steps_makes_the_number_of_epochs_irrelevant(BASE):
    parse_args(BASE + ["--num_train_epochs", "0", "--max_steps", "3"])


def test_resume_from_a_missing_or_empty_checkpoint_is_one_line(unloadable_model, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir"
    assert finetune_errors(unloadable_model, tmp_path, capsys, "--resume_from_checkpoint", str(missing)) == [
        f"--resume_from_checkpoint {missing}: no such directory."]
    assert finetune_errors(unloadable_model, tmp_path, capsys, "--resume_from_checkpoint", "True") == [
        f"--resume_from_checkpoint True: --output_dir {tmp_path / 'out'} holds no checkpoint-N directory to resume "
        "from; start without --resume_from_checkpoint, or pass the checkpoint's directory."]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-6").mkdir(parents=True)
    (run_dir / "checkpoint-6" / "trainer_state.json").write_text("{}")
    assert finetune_errors(unloadable_model, tmp_path, capsys, "--resume_from_checkpoint", str(run_dir)) == [
        f"--resume_from_checkpoint {run_dir}: not a checkpoint (no trainer_state.json, which the Trainer writes in "
        f"every checkpoint-N directory). It holds checkpoints: pass one of them, e.g. {run_dir / 'checkpoint-6'}."]


def test_a_deepspeed_config_that_is_missing_or_broken_is_named(unloadable_model, tmp_path, capsys):
    broken = broken_json(tmp_path)
    assert finetune_errors(unloadable_model, tmp_path, capsys, "--deepspeed", str(broken)) == [
        f"--deepspeed {broken}: not valid JSON (line 1, column 37: Expecting property name enclosed in double quotes)."]
    assert finetune_errors(unloadable_model, tmp_path, capsys, "--deepspeed", str(tmp_path / "ds.json")) == [
        f"--deepspeed {tmp_path / 'ds.json'}: no such file."]
    assert finetune_errors(unloadable_model, tmp_path, capsys, "--deepspeed", "[1]") == [
        "--deepspeed [1]: no such file."]


def test_an_unknown_flag_is_named_with_the_closest_known_one(unloadable_model, tmp_path, capsys):
    assert finetune_errors(unloadable_model, tmp_path, capsys, "--lora_rank", "8", "--lerning_rate=1e-3", "stray") == [
        "unknown flag --lora_rank: did you mean --lora_r? (python finetune.py --help lists every flag)",
        "unknown flag --lerning_rate: did you mean --learning_rate? (python finetune.py --help lists every flag)",
        "'stray' follows no flag: every value is given as --flag VALUE."]


def test_an_arguments_file_with_an_unknown_key_or_broken_json_is_named(model, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": model, "data_path": "d.json", "output_dir": "o",
                                    "lora_rank": 8}))
    with pytest.raises(ArgumentError, match=f"^unknown key in {path}: lora_rank: did you mean lora_r\\?$"):
        parse_args([str(path)])
    path.write_text(yaml.safe_dump({"data_path": "d.json"}))
    with pytest.raises(ArgumentError, match=f"^{path}: model_name_or_path is required"):
        parse_args([str(path)])
    broken = broken_json(tmp_path)
    with pytest.raises(ArgumentError, match=f"^arguments file {broken}: not valid JSON \\(line 1, column 37: "):
        parse_args([str(broken)])


def test_bf16_and_fp16_together_name_the_conflict(unloadable_model, tmp_path, capsys):
    assert finetune_errors(unloadable_model, tmp_path, capsys, "--bf16", "True", "--fp16", "True") == [
        "--bf16 and --fp16 both ask for 16-bit mixed precision: choose one (bf16 where the hardware has it; it needs "
        "no loss scaling)."]


def test_every_problem_is_listed_at_once(unloadable_model, tmp_path, capsys):
    """transformers' own setup stops at its first problem; these are collected with all the others."""
    errors = finetune_errors(unloadable_model, tmp_path, capsys, "--deepspeed", str(broken_json(tmp_path)),
                             "--bf16", "True", "--fp16", "True", "--use_lora", "--lora_r", "0", "--lora_rank", "8",
                             "--resume_from_checkpoint", str(tmp_path / "nowhere"))
    assert [line.split(":")[0].split(" ")[0] for line in errors] == [
        "--deepspeed", "--bf16", "unknown", "--lora_r", "--resume_from_checkpoint"]


def test_setup_problems_raise_outside_parse_args(tmp_path):
    from chatft.args import TrainingArguments

    with pytest.raises(ArgumentError, match="^--bf16 and --fp16 both ask"):
        TrainingArguments(output_dir=str(tmp_path), bf16=True, fp16=True, use_cpu=True)


def test_a_truncated_gguf_model_is_one_line(tmp_path, capsys):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<I", 3))  # the magic and the version, nothing more
    assert finetune_errors(str(truncated), tmp_path, capsys) == [
        f"--model_name_or_path {truncated}: the file ends inside its header (truncated, or not completely written): "
        "export or download it again"]


def test_tokenizing_workers_default_to_the_cores(model, tmp_path):
    import os

    base = ["--model_name_or_path", model, "--data_path", "data/identity_demo.json", "--output_dir", str(tmp_path)]
    cores = min(16, len(os.sched_getaffinity(0)))
    assert parse_args(base)[1].num_workers == cores
    assert parse_args(base + ["--lazy_preprocess", "True"])[1].num_workers == 1  # tokenized when first used
    assert parse_args(base + ["--preprocessing_num_workers", "3"])[1].num_workers == 3
    with pytest.raises(ArgumentError, match="--preprocessing_num_workers must be at least 1, not 0"):
        parse_args(base + ["--preprocessing_num_workers", "0"])


def test_no_pinned_memory_without_an_accelerator(BASE):
    """Pinned memory only speeds copies to an accelerator; on a CPU-only machine (or --use_cpu) torch warns about it
    at the first batch, a library line in the console of `python finetune.py ...` without the launchers' flags."""
    assert parse_args(BASE + ["--use_cpu", "True"])[2].dataloader_pin_memory is False
    if not torch.accelerator.is_available():
        assert parse_args(BASE)[2].dataloader_pin_memory is False

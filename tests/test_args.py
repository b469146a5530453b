"""Flags, config files and the cross-field checks."""

import json
from types import SimpleNamespace

import pytest
import yaml

from chatft.args import ArgumentError, deepspeed_zero_stage, parse_args
from support import ROOT


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
                                              "--lora_target_modules", "q_proj", "v_proj", "--seed", "7"])
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
    with pytest.raises(ArgumentError, match="Invalid arguments"):
        parse_args(BASE + ["--bf16", "True", "--fp16", "True"])


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

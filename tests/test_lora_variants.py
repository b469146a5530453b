"""LoRA variants through peft's options (--use_dora, --use_rslora, --lora_init, --loraplus_lr_ratio): each trains,
and merge_lora.py's merged model computes what the trained model computed — for PiSSA/OLoRA, whose training rewrote
the base weights, through the adapter finetune.py saved converted to a plain LoRA of the original base."""

import json

import peft
import pytest
import torch

import merge_lora
from chatft.args import parse_args
from chatft.errors import ArgumentError
from chatft.model.lora_variants import lora_init_problem, peft_init_lora_weights
from chatft.train.optim import raise_lora_b_learning_rate
from support import assert_close_up_to_rounding, decoder_terms, probe_logits, run

VARIANTS = {
    "dora": ["--use_dora"],
    "rslora": ["--use_rslora"],
    "gaussian": ["--lora_init", "gaussian"],
    "pissa": ["--lora_init", "pissa"],
    "pissa_niter": ["--lora_init", "pissa_niter_2"],
    "olora": ["--lora_init", "olora"],
    "loraplus": ["--loraplus_lr_ratio", "16"],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_and_merged_equals_adapter(variant, tiny_qwen2_arch_dir, data_file, tmp_path):
    trainer = run(tiny_qwen2_arch_dir, data_file, tmp_path / "lora", "--use_lora", "--lora_r", "4",
                  "--learning_rate", "1e-2", *VARIANTS[variant])
    assert merge_lora.main(["--adapter_path", str(tmp_path / "lora"), "--output_dir", str(tmp_path / "merged")]) == 0
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    trained = trainer.model.float()  # what training computed (PiSSA/OLoRA: on the rewritten base)
    adapter = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora")  # the saved adapter on the base
    terms = decoder_terms(merged.config)
    expected = probe_logits(trained, tokenizer)
    assert_close_up_to_rounding(probe_logits(adapter, tokenizer), expected, terms=terms)
    assert_close_up_to_rounding(probe_logits(merged, tokenizer), expected, terms=terms)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir)
    assert (probe_logits(base, tokenizer) - expected).abs().max() > 1e-3  # training changed the model
    config = json.load(open(tmp_path / "lora" / "adapter_config.json"))
    assert config["use_dora"] == (variant == "dora") and config["use_rslora"] == (variant == "rslora")
    if variant in ("pissa", "pissa_niter", "olora"):  # saved as a plain LoRA of rank 2r
        assert config["init_lora_weights"] is True and config["r"] == 8 and config["lora_alpha"] == 32


def test_pissa_checkpoint_is_not_merged(tiny_qwen2_arch_dir, data_file, tmp_path, capsys):
    run(tiny_qwen2_arch_dir, data_file, tmp_path / "lora", "--use_lora", "--lora_r", "4", "--lora_init", "pissa",
        "--save_strategy", "steps", "--save_steps", "3")
    assert json.load(open(tmp_path / "lora" / "checkpoint-3" / "adapter_config.json"))["init_lora_weights"] == "pissa"
    assert merge_lora.main(["--adapter_path", str(tmp_path / "lora" / "checkpoint-3"),
                            "--output_dir", str(tmp_path / "merged")]) == 2
    assert "merge the run's output_dir" in capsys.readouterr().err


def test_loraplus_gives_b_matrices_their_own_learning_rate(tiny_qwen2_arch_dir, data_file, tmp_path):
    trainer = run(tiny_qwen2_arch_dir, data_file, tmp_path / "lora", "--use_lora", "--lora_r", "4",
                  "--learning_rate", "1e-3", "--weight_decay", "0.1", "--loraplus_lr_ratio", "16",
                  "--lr_scheduler_type", "constant")
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    groups = [(group["lr"], group["weight_decay"], [names[id(p)] for p in group["params"]])
              for group in trainer.optimizer.param_groups if group["params"]]
    b_groups = [g for g in groups if any(".lora_B." in name for name in g[2])]
    assert b_groups and all(lr == pytest.approx(16e-3) and all(".lora_B." in n for n in params)
                            for lr, _, params in b_groups)
    other = [g for g in groups if g not in b_groups]
    assert other and all(lr == pytest.approx(1e-3) and not any(".lora_B." in n for n in params)
                         for lr, _, params in other)
    # weight decay stays where transformers put it: every B matrix is a weight, in a decayed group
    assert {wd for _, wd, _ in b_groups} == {0.1}


def test_raise_lora_b_learning_rate_keeps_group_settings():
    model = torch.nn.Module()
    model.lora_A = torch.nn.Linear(2, 2)
    model.add_module("x", torch.nn.Module())
    model.x.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 2, bias=False)})
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "weight_decay": 0.1}], lr=1e-3)
    assert raise_lora_b_learning_rate(optimizer, model, 4.0) == 1
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups] == [
        (1e-3, 0.1, 2), (4e-3, 0.1, 1)]


def test_lora_init_values():
    assert peft_init_lora_weights("default") is True
    assert peft_init_lora_weights("pissa_niter_4") == "pissa_niter_4"
    for ok in ("default", "gaussian", "olora", "pissa", "pissa_niter_16"):
        assert lora_init_problem(ok) is None
    assert "LoftQ" in lora_init_problem("loftq") and "activations" in lora_init_problem("eva")
    assert "must be one of" in lora_init_problem("pissa_niter_x")


@pytest.mark.parametrize("flags, message", [
    (["--use_dora"], "--use_dora needs --use_lora"),
    (["--use_lora", "--lora_init", "eva"], "--lora_init eva needs the training data's activations"),
    (["--use_lora", "--lora_init", "kaiming"], "--lora_init must be one of"),
    (["--use_lora", "--q_lora", "--lora_init", "pissa"], "rewrites the base weights, which a 4-bit base"),
    (["--use_lora", "--use_dora", "--lora_init", "olora"], "cannot be combined with --use_dora"),
    (["--use_lora", "--loraplus_lr_ratio", "0"], "--loraplus_lr_ratio must be positive"),
    (["--use_lora", "--loraplus_lr_ratio", "16", "--deepspeed", "ds_config_zero3_offload.json"],
     "names its own optimizer"),
    (["--use_lora", "--lora_init", "pissa", "--deepspeed", "ds_config_zero3.json"], "ZeRO-3 and FSDP partition"),
])
def test_refused_combinations(flags, message, tiny_qwen2_arch_dir, data_file, tmp_path):
    argv = ["--model_name_or_path", str(tiny_qwen2_arch_dir), "--data_path", data_file,
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "True", *flags]
    with pytest.raises(ArgumentError, match=message):
        parse_args(argv)

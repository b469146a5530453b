"""Training modes on a tiny random qwen3_moe model (4 experts, top 2, the router's aux loss on; issue 27): DDP and FSDP
with 2 processes take 1 process's steps (loss with its aux term, final weights), a resumed LoRA run with expert
adapters ends where an uninterrupted one ends, and flags a MoE model cannot honour are one line, exit 2."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from support import (CONVERSATIONS, assert_close_up_to_rounding, assert_same_logged_steps, build_tiny_moe, logged_steps,
                     run, write_json)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("moe"), "qwen3_moe")


@pytest.fixture(scope="module")
def moe_data(tmp_path_factory):
    return str(write_json(tmp_path_factory.mktemp("data") / "train.json", CONVERSATIONS * 2))


def assert_same_steps(got_dir, expected_dir, moe_dir, weights_file, *, step=1e-3, steps=3):
    """Two runs took the same steps: each logged loss, its lm and aux parts (the aux term included:
    loss = lm_loss + 0.25 x aux_loss), the learning rate, and the final weights in `weights_file`."""
    expected, terms = assert_same_logged_steps(got_dir, expected_dir, moe_dir, steps=steps,
                                               logged=("lm_loss", "aux_loss"))
    for entry in logged_steps(got_dir):  # lm_loss and aux_loss are logged to 4 decimals
        assert entry["lm_loss"] + 0.25 * entry["aux_loss"] == pytest.approx(entry["loss"], abs=2e-4)
    final, reference = (safetensors.torch.load_file(path / weights_file) for path in (got_dir, expected_dir))
    assert final.keys() == reference.keys() and any("experts" in name for name in final)
    for name in reference:
        assert_close_up_to_rounding(final[name], reference[name], terms=terms,
                                    magnitude=reference[name].abs().max() + steps * step)
    return final


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_ddp_two_processes_equal_one(mode, moe_dir, moe_data, tmp_path):
    """DDP, 2 processes x batch 2, take the steps of 1 process x batch 2 x accumulation 2 (the same micro-batches: the
    aux loss is a mean per micro-batch), the aux term in each logged loss, both runs exit 0. The routed experts are
    fused 3-D parameters, so every rank's backward reaches each of them: no unused parameter for DDP to wait for
    (transformers' find_unused_parameters stays on for LoRA and for full training without checkpointing)."""
    from test_distributed import common_flags, torchrun

    flags = ["--per_device_train_batch_size", "2"]
    if mode == "lora":  # the default MoE LoRA: attention and the routed experts
        flags += ["--use_lora", "--lora_r", "4", "--lora_dropout", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(1, "finetune.py", *common_flags(moe_dir, moe_data, one, *flags, "--gradient_accumulation_steps", "2"))
    torchrun(2, "finetune.py", *common_flags(moe_dir, moe_data, two, *flags))
    saved = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    final = assert_same_steps(two, one, moe_dir, saved)
    base = safetensors.torch.load_file(moe_dir / "model.safetensors")
    if mode == "full":  # every expert and the router trained (saved per expert, as the checkpoint format has them)
        names = [f"model.layers.0.mlp.experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")]
        for name in [*names, "model.layers.0.mlp.gate.weight"]:
            assert not torch.equal(final[name], base[name]), name
    else:
        expert_b = [tensor for name, tensor in final.items() if "experts" in name and "lora_B" in name]
        assert len(expert_b) == 4 and all(tensor.abs().max() > 0 for tensor in expert_b)


def test_fsdp_wraps_whole_decoder_layers_with_their_experts(moe_dir):
    """FSDP's default wrap (transformers: the model's _no_split_modules as transformer_layer_cls_to_wrap) puts each
    decoder layer, router and experts included, in one FSDP unit: ranks whose tokens pick different experts still
    gather and reduce the same units. (FSDP itself needs a GPU: not run here.)"""
    from accelerate.utils.dataclasses import get_module_class_from_name

    model = transformers.AutoModelForCausalLM.from_pretrained(moe_dir)
    [wrapped] = model._no_split_modules
    layer_class = get_module_class_from_name(model, wrapped)
    units = [module for module in model.modules() if isinstance(module, layer_class)]
    assert len(units) == 2 and all(hasattr(unit.mlp, "experts") and hasattr(unit.mlp, "gate") for unit in units)


def test_fsdp_on_the_cpu_is_one_line(moe_dir, moe_data, tmp_path, capsys):
    """On the CPU accelerate leaves its FSDP plugin unused and runs DDP: refused before anything loads."""
    import finetune

    code = finetune.main(["--model_name_or_path", str(moe_dir), "--data_path", moe_data, "--output_dir",
                          str(tmp_path / "out"), "--use_cpu", "True", "--fsdp", "full_shard auto_wrap"])
    assert code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err.splitlines() == [
        "error: --fsdp: FSDP shards on GPUs (accelerators) only; on the CPU the run would be plain DDP, every process "
        "holding the whole model: drop --fsdp, or shard with --deepspeed ds_config_zero3.json."]


def test_resumed_lora_run_ends_like_an_uninterrupted_one(moe_dir, moe_data, tmp_path):
    """LoRA with expert adapters, resumed from the uninterrupted run's checkpoint-2 into another directory: steps 3 and
    4 and the final adapter (expert adapters included) are the uninterrupted run's. Expert adapters left at their
    zero start, or their Adam state lost, would show in the experts' lora_B."""
    flags = ["--use_lora", "--lora_r", "4", "--learning_rate", "1e-2", "--max_steps", "4", "--save_strategy", "steps",
             "--save_steps", "2", "--seed", "5"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(moe_dir, moe_data, whole, *flags)
    checkpoint = safetensors.torch.load_file(whole / "checkpoint-2" / "adapter_model.safetensors")
    assert any("experts" in name and "lora_B" in name and tensor.abs().max() > 0 for name, tensor in checkpoint.items())
    run(moe_dir, moe_data, resumed, *flags, "--resume_from_checkpoint", str(whole / "checkpoint-2"))
    assert [entry["step"] for entry in logged_steps(resumed)] == [1, 2, 3, 4]  # 1 and 2 from the checkpoint's state
    assert_same_steps(resumed, whole, moe_dir, "adapter_model.safetensors", step=1e-2, steps=4)


# A mixture-of-experts model whose code ships with it (auto_map, --trust_remote_code) and whose attention is its own, as
# some MoE models' remote code is: its class says so to transformers (_supports_attention_backend False).
OWN_ATTENTION_MOE = '''
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM


class OwnAttentionMoeConfig(Qwen3MoeConfig):
    model_type = "own_attention_qwen3_moe"


class OwnAttentionMoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = OwnAttentionMoeConfig
    _supports_attention_backend = False
'''


def test_packing_with_a_models_own_attention_is_one_line_before_it_loads(moe_dir, moe_data, tmp_path, capsys,
                                                                          monkeypatch):
    import shutil

    import finetune

    path = Path(shutil.copytree(moe_dir, tmp_path / "own_attention_moe"))
    (path / "modeling_own_attention_moe.py").write_text(OWN_ATTENTION_MOE)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="own_attention_qwen3_moe", architectures=["OwnAttentionMoeForCausalLM"], auto_map={
        "AutoConfig": "modeling_own_attention_moe.OwnAttentionMoeConfig",
        "AutoModelForCausalLM": "modeling_own_attention_moe.OwnAttentionMoeForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were refused")

    monkeypatch.setattr(finetune, "load_model", no_load)
    code = finetune.main(["--model_name_or_path", str(path), "--data_path", moe_data, "--output_dir",
                          str(tmp_path / "out"), "--use_cpu", "True", "--packing", "True",
                          "--trust_remote_code", "True"])
    assert code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err.splitlines() == [
        "error: --packing: OwnAttentionMoeForCausalLM has its own attention code, which would let packed samples "
        "attend to each other; train without --packing."]


def test_liger_kernel_without_its_package_is_one_line(moe_dir, moe_data, tmp_path, capsys):
    """transformers raised an ImportError (a traceback) once the Trainer was built, after the model loaded."""
    import importlib.util

    import finetune

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    code = finetune.main(["--model_name_or_path", str(moe_dir), "--data_path", moe_data, "--output_dir",
                          str(tmp_path / "out"), "--use_cpu", "True", "--use_liger_kernel", "True"])
    assert code == 2 and capsys.readouterr().err.splitlines() == [
        "error: --use_liger_kernel True needs the liger-kernel package: pip install liger-kernel"]

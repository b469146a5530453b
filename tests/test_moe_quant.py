"""Quantized modes on tiny random qwen2_moe and qwen3_moe models (4 experts, top 2, the real Qwen tokenizer): Q-LoRA
(NF4) quantizes the linear layers and keeps the fused experts in the compute dtype (bitsandbytes quantizes nn.Linear
only; not upcast to fp32), every expert adapter gets a gradient, the loss stays near the bf16 model's, the memory
estimate counts the experts as loaded, and a Q-LoRA MoE adapter merges with its expert deltas. GPTQ (gptqmodel splits
the experts per expert) quantizes qwen3_moe and keeps its loss; qwen2_moe, and --q_lora on a GPTQ MoE model, are one
line, exit 2, before any weight loads."""

import logging

import peft
import pytest
import torch
import transformers

import merge_lora
from chatft.memory import NF4_BYTES_PER_WEIGHT, estimate_training_memory
from support import CONVERSATIONS, assert_close_up_to_rounding, build_tiny_moe, decoder_terms, probe_logits, run, \
    write_json

MOE_TYPES = ["qwen2_moe", "qwen3_moe"]
# |loss(NF4 base) - loss(bf16 model)| on one probe text; measured 0.0030 (qwen3_moe) and 0.0014 (qwen2_moe): the linear
# layers' 4-bit rounding only, the experts being exact. A quantized expert stack or a broken layer would move it more.
NF4_LOSS_BOUND = 0.05


@pytest.fixture(scope="module", params=MOE_TYPES)
def moe_dir(request, tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("moe"), request.param)


@pytest.fixture(scope="module")
def moe_data(tmp_path_factory):
    return str(write_json(tmp_path_factory.mktemp("data") / "train.json", CONVERSATIONS))


def planned(moe_dir, *flags):
    """(plan, lora_args) of a bf16 --q_lora run on `moe_dir`."""
    from chatft.args import parse_args
    from chatft.plan import plan_run

    args = parse_args(["--model_name_or_path", str(moe_dir), "--data_path", "unused.json", "--output_dir", "unused",
                       "--bf16", "True", "--use_cpu", "True", "--model_max_length", "64", "--use_lora", "--q_lora",
                       "--lora_r", "4", *flags])
    return plan_run(*args)[0], args[3]


def probe_ids(tokenizer):
    return tokenizer("Who are you? I am Tessa. 2+2? 4. Bye, goodbye!", return_tensors="pt").input_ids


def test_nf4_keeps_experts_in_the_compute_dtype_and_trains_their_adapters(moe_dir, caplog):
    from chatft.model.load import load_model

    plan, lora_args = planned(moe_dir, "--activation_checkpointing")
    with caplog.at_level(logging.INFO, logger="chatft.model.load"):
        model = load_model(plan, lora_args, torch.device("cpu"))
    said = [r.getMessage() for r in caplog.records
            if "routed experts" in r.getMessage() and "not 4-bit" in r.getMessage()]
    assert len(said) == 1 and "bfloat16" in said[0] and "bitsandbytes quantizes linear layers only" in said[0]
    layer = model.base_model.model.model.layers[0]
    assert type(layer.self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    experts = layer.mlp.experts.base_layer.base_layer
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.bfloat16  # not upcast to fp32
    assert layer.input_layernorm.weight.dtype == torch.float32  # what prepare_model_for_kbit_training still upcasts
    # every expert adapter (both projections, both layers) gets a gradient through the 4-bit model
    tokenizer = transformers.AutoTokenizer.from_pretrained(moe_dir)
    ids = probe_ids(tokenizer)
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02)  # lora_B starts at zero: no gradient would reach lora_A
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    expert_adapters = {name: p for name, p in model.named_parameters() if "mlp.experts" in name and p.requires_grad}
    assert len(expert_adapters) == 8
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in expert_adapters.values()), \
        [name for name, p in expert_adapters.items() if p.grad is None or not p.grad.abs().max() > 0]


def test_nf4_loss_is_near_the_bf16_models(moe_dir):
    from chatft.model.load import nf4_config

    tokenizer = transformers.AutoTokenizer.from_pretrained(moe_dir)
    ids = probe_ids(tokenizer)
    losses = []
    for quantization in ({}, {"quantization_config": nf4_config(torch.bfloat16), "device_map": {"": "cpu"}}):
        model = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.bfloat16, **quantization)
        with torch.no_grad():
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    assert 0 < abs(losses[1] - losses[0]) < NF4_LOSS_BOUND, losses  # 0: nothing was quantized


def test_memory_estimate_counts_nf4_layers_and_experts_as_loaded(moe_dir):
    from chatft.model.load import load_model

    plan, lora_args = planned(moe_dir)
    model = load_model(plan, lora_args, torch.device("cpu"))
    estimate = estimate_training_memory(plan, 64)
    four_bit = sum(p.quant_state.shape.numel() * NF4_BYTES_PER_WEIGHT for p in model.parameters()
                   if type(p).__name__ == "Params4bit")
    stored = sum(p.numel() * p.element_size() for p in model.parameters() if type(p).__name__ != "Params4bit")
    assert estimate.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate.weights == int(four_bit) + stored


@pytest.mark.slow
def test_qlora_adapter_merges_with_its_expert_deltas(moe_dir, moe_data, tmp_path):
    output_dir = tmp_path / "qlora"
    run(moe_dir, moe_data, output_dir, "--use_lora", "--q_lora", "--lora_r", "4", "--bf16", "True",
        "--activation_checkpointing", "--learning_rate", "1e-2")
    assert merge_lora.main(["--adapter_path", str(output_dir), "--output_dir", str(tmp_path / "merged"),
                            "--dtype", "float32"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(moe_dir), output_dir)
    assert_close_up_to_rounding(probe_logits(merged, tokenizer), probe_logits(adapter, tokenizer),
                                terms=decoder_terms(merged.config))
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_dir)
    for name in ("gate_up_proj", "down_proj"):
        delta = getattr(merged.model.layers[0].mlp.experts, name) - getattr(base.model.layers[0].mlp.experts, name)
        assert delta.abs().amax(dim=(1, 2)).min() > 0  # every expert got its delta


def test_gptq_group_size_counts_the_experts_widths(moe_dir):
    from chatft.errors import QuantizeError
    from chatft.export.gptq import choose_group_size, linear_input_widths

    widths = linear_input_widths(str(moe_dir))
    assert 16 in widths  # the routed experts' down_proj (qwen2_moe's shared expert's down_proj reads 24)
    with pytest.raises(QuantizeError, match="No group size of 128, 64 or 32 divides the layer widths"):
        choose_group_size(None, widths)


def test_qlora_on_a_gptq_moe_is_one_line(moe_dir, moe_data, tmp_path, capsys):
    import json
    import finetune
    from support import unloadable_copy

    gptq = unloadable_copy(moe_dir, tmp_path)  # the refusal must come before any weight loads
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (gptq / "config.json").write_text(json.dumps(config))
    code = finetune.main(["--model_name_or_path", str(gptq), "--data_path", moe_data, "--output_dir",
                          str(tmp_path / "out"), "--use_lora", "--q_lora", "--use_cpu", "True"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and "is a GPTQ mixture-of-experts model" in err[0], err


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_gptq_on_moe_is_one_line_before_loading(model_type, moe_data, tmp_path, capsys):
    """GPTQ of a MoE model is refused: gptqmodel 7.7 writes each expert as its own GPTQ layer, and transformers 5.25
    loads the result (in any process but the one that quantized it) with the experts fused and randomly initialized,
    the GPTQ expert weights unread (measured on qwen3_moe: 4 missing, 96 unexpected keys)."""
    import run_gptq
    from support import unloadable_copy

    model_dir = unloadable_copy(build_tiny_moe(tmp_path, model_type), tmp_path, keep_tokenizer=True)
    capsys.readouterr()  # what building it printed
    code = run_gptq.main(["--model_name_or_path", str(model_dir), "--data_path", moe_data, "--output_dir",
                          str(tmp_path / "gptq")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and f"GPTQ is not available for {model_type} models" in err[0], err
    assert "randomly initialized" in err[0] and not (tmp_path / "gptq").exists()



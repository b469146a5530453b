"""Mixture-of-experts LoRA on tiny random qwen2_moe and qwen3_moe models (4 experts, top 2, the real Qwen tokenizer):
the default targets adapt attention (and qwen2_moe's shared expert) plus the routed experts' fused 3-D weights through
peft's target_parameters, the router stays frozen unless --lora_target_parameters names it, the merged model computes
what base + adapter computed (expert deltas included), and bad targets are one line, exit 2."""

import peft
import pytest
import torch
import transformers

import finetune
import merge_lora
from chatft.train.expert_load import ExpertLoad
from support import CONVERSATIONS, assert_close_up_to_rounding, build_tiny_moe, decoder_terms, probe_logits, \
    rounding_atol, run, write_json

MOE_TYPES = ["qwen2_moe", "qwen3_moe"]
# per decoder layer, what the default LoRA adapts (peft nests the two expert adapters: experts, experts.base_layer)
DEFAULT_ADAPTED = {
    "qwen3_moe": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.experts",
                  "mlp.experts.base_layer"},
}
DEFAULT_ADAPTED["qwen2_moe"] = DEFAULT_ADAPTED["qwen3_moe"] | {
    "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj", "mlp.shared_expert_gate"}


@pytest.fixture(scope="module", params=MOE_TYPES)
def moe_dir(request, tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("moe"), request.param)


@pytest.fixture(scope="module")
def moe_data(tmp_path_factory):
    return str(write_json(tmp_path_factory.mktemp("data") / "train.json", CONVERSATIONS))


@pytest.fixture(scope="module")
def default_run(moe_dir, moe_data, tmp_path_factory):
    """(trainer, output_dir) of a 3-step default LoRA run on `moe_dir`."""
    output_dir = tmp_path_factory.mktemp("run") / "lora"
    return run(moe_dir, moe_data, output_dir, "--use_lora", "--lora_r", "4", "--learning_rate", "1e-2"), output_dir


def adapted_modules(model) -> set[str]:
    """What layer 0 adapts: the module paths (below the layer) that own a trainable lora_A/lora_B."""
    return {name.split(".layers.0.")[1].split(".lora_")[0] for name, parameter in model.named_parameters()
            if parameter.requires_grad and ".layers.0." in name}


def routers(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().float().clone() for name, parameter in model.named_parameters()
            if name.endswith("mlp.gate.weight") or name.endswith("mlp.gate.base_layer.weight")}


def test_default_lora_adapts_attention_and_experts_and_freezes_the_router(default_run, moe_dir):
    trainer, _ = default_run
    model = trainer.model
    model_type = model.config.model_type
    assert adapted_modules(model) == DEFAULT_ADAPTED[model_type]
    assert not any("mlp.gate." in name for name, p in model.named_parameters() if p.requires_grad)
    assert sorted(model.peft_config["default"].target_parameters) == ["mlp.experts.down_proj",
                                                                      "mlp.experts.gate_up_proj"]
    # every expert adapter (both layers, both projections) moved from its zero start: it got a gradient
    expert_b = [p for name, p in model.named_parameters() if "mlp.experts" in name and "lora_B" in name]
    assert len(expert_b) == 4 and all(p.abs().max() > 0 for p in expert_b)
    # the router is frozen: its weights are the base model's, bit for bit
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=next(iter(routers(model).values())).dtype)
    trained = {name.removeprefix("base_model.model."): w for name, w in routers(model).items()}
    assert trained.keys() == routers(base).keys() and len(trained) == 2
    assert all(torch.equal(trained[name], w) for name, w in routers(base).items())
    # dropout stays on the linear adapters; peft's expert adapters have none
    layer = model.base_model.model.model.layers[0]
    assert layer.self_attn.q_proj.lora_dropout["default"].p == 0.05
    assert isinstance(layer.mlp.experts.lora_dropout["default"], torch.nn.Identity)
    # the expert load is counted through peft's wrappers of the experts (the summary's line)
    load = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ExpertLoad))
    assert load.layers == ["0", "1"] and load.text() is not None


def test_merge_equals_adapter_with_expert_deltas(default_run, moe_dir, tmp_path):
    _, output_dir = default_run
    assert merge_lora.main(["--adapter_path", str(output_dir), "--output_dir", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    adapter = peft.AutoPeftModelForCausalLM.from_pretrained(output_dir)
    assert_close_up_to_rounding(probe_logits(merged, tokenizer), probe_logits(adapter, tokenizer),
                                terms=decoder_terms(merged.config))
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_dir)
    for name in ("gate_up_proj", "down_proj"):
        merged_experts = getattr(merged.model.layers[0].mlp.experts, name)
        base_experts = getattr(base.model.layers[0].mlp.experts, name)
        assert (merged_experts - base_experts).abs().amax(dim=(1, 2)).min() > 0  # every expert got its delta
    assert torch.equal(merged.model.layers[0].mlp.gate.weight, base.model.layers[0].mlp.gate.weight)


def test_router_trains_when_targeted(moe_dir, moe_data, tmp_path):
    trainer = run(moe_dir, moe_data, tmp_path / "lora", "--use_lora", "--lora_r", "4", "--learning_rate", "1e-2",
                  "--lora_target_modules", "q_proj", "--lora_target_parameters", "mlp.gate.weight",
                  "experts.down_proj")
    model = trainer.model
    assert adapted_modules(model) == {"self_attn.q_proj", "mlp.gate", "mlp.experts"}
    router_b = [p for name, p in model.named_parameters() if "mlp.gate.lora_B" in name]
    assert len(router_b) == 2 and all(p.abs().max() > 0 for p in router_b)
    assert merge_lora.main(["--adapter_path", str(tmp_path / "lora"), "--output_dir", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_dir)
    assert not torch.equal(merged.model.layers[0].mlp.gate.weight, base.model.layers[0].mlp.gate.weight)
    assert torch.equal(merged.model.layers[0].mlp.experts.gate_up_proj, base.model.layers[0].mlp.experts.gate_up_proj)


def test_no_expert_adapters_when_asked(moe_dir, moe_data, tmp_path, capsys):
    trainer = run(moe_dir, moe_data, tmp_path / "lora", "--use_lora", "--lora_r", "4", "--max_steps", "1",
                  "--lora_target_parameters", "none")
    assert not any("experts" in module for module in adapted_modules(trainer.model))
    assert trainer.model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"].p == 0.05
    summary = [line for line in capsys.readouterr().out.splitlines() if "expert load" in line]
    assert len(summary) == 1 and "uniform 0.250 (4 experts)" in summary[0]


def test_expert_load_counts_the_routers_choices_over_real_tokens(moe_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(moe_dir).train()
    tokenizer = transformers.AutoTokenizer.from_pretrained(moe_dir)
    batch = tokenizer(["Who are you? I am Tessa, a helpful assistant.", "Hi"], padding=True, return_tensors="pt")
    load = ExpertLoad.attach(model)
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
        model(**batch)  # a second forward adds to the counts
        model.eval()(**batch)  # evaluation is not counted
    real = batch["attention_mask"].reshape(-1).bool()
    assert real.sum() < real.numel()  # padding to leave out
    expected = [2 * torch.bincount(logits[real].topk(2).indices.reshape(-1), minlength=4)
                for logits in out.router_logits]
    counts = load.tokens_per_expert()
    assert len(counts) == 2 and all(torch.equal(c, e) for c, e in zip(counts, expected))
    shares = [c / c.sum() for c in counts]
    busiest = [s.max().item() for s in shares]
    assert load.text().startswith(f"busiest expert {sum(busiest) / 2:.3f} of routed tokens (mean of 2 layers; worst "
                                  f"{max(busiest):.3f} in layer {busiest.index(max(busiest))}), least used "
                                  f"{min(s.min().item() for s in shares):.3f}; uniform 0.250 (4 experts)")
    assert ExpertLoad.attach(transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "qwen3", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8))) is None


@pytest.mark.parametrize("flags, message", [
    (["--lora_target_parameters", "experts.w1"],
     "error: --lora_target_parameters: experts.w1 is not a parameter of this {cls}; its expert and router parameters "
     "are mlp.experts.down_proj, mlp.experts.gate_up_proj, mlp.gate.weight"),
    (["--lora_target_modules", "q_proj", "gate"],
     "error: --lora_target_modules: gate is not a linear layer; adapt experts and routers with "
     "--lora_target_parameters mlp.experts.down_proj mlp.experts.gate_up_proj mlp.gate.weight"),
    (["--lora_target_parameters", "mlp.gate.weight", "--use_dora"],
     "error: --lora_target_parameters: peft adapts bare parameters (experts, routers) with plain LoRA only, not with "
     "--use_dora; drop one of them."),
])
def test_bad_targets_are_one_line(flags, message, moe_dir, moe_data, tmp_path, capsys):
    argv = ["--model_name_or_path", str(moe_dir), "--data_path", moe_data, "--output_dir", str(tmp_path / "out"),
            "--use_cpu", "True", "--use_lora", *flags]
    capsys.readouterr()
    assert finetune.main(argv) == 2
    cls = transformers.AutoConfig.from_pretrained(moe_dir).architectures[0]
    assert capsys.readouterr().err.splitlines() == [message.format(cls=cls)]


def test_dora_leaves_the_experts_frozen(moe_dir, moe_data, tmp_path):
    trainer = run(moe_dir, moe_data, tmp_path / "lora", "--use_lora", "--lora_r", "4", "--max_steps", "1",
                  "--use_dora")
    assert not any("experts" in module for module in adapted_modules(trainer.model))


@pytest.mark.parametrize("flags", [[], ["--lora_target_parameters", "mlp.gate.weight", "experts.down_proj"]],
                         ids=["default", "router"])
def test_memory_estimate_counts_experts_their_adapters_and_the_router(moe_dir, flags):
    """The estimator's trainable and total parameter counts, from the config alone, equal the loaded peft model's."""
    from chatft.args import parse_args
    from chatft.memory import estimate_training_memory
    from chatft.model.load import load_model
    from chatft.plan import plan_run

    args = parse_args(["--model_name_or_path", str(moe_dir), "--data_path", "unused.json", "--output_dir", "unused",
                       "--bf16", "True", "--use_cpu", "True", "--model_max_length", "64", "--use_lora", "--lora_r", "4",
                       *flags])
    plan, _ = plan_run(*args)
    model, estimate = load_model(plan, args[3]), estimate_training_memory(plan, 64)
    assert estimate.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    experts = [p for name, p in model.named_parameters() if "mlp.experts" in name and p.requires_grad]
    # 2 layers, r 4, 4 experts: r·E·(in + out) for gate_up_proj (32 -> 2·16) and down_proj (16 -> 32)
    assert sum(p.numel() for p in experts) == 2 * 4 * 4 * ((32 + 2 * 16) * (not flags) + (16 + 32))


def test_continued_adapter_keeps_linear_dropout_and_trains_its_experts(default_run, moe_dir):
    from chatft.args import parse_args
    from chatft.model.load import load_model
    from chatft.plan import plan_run

    _, output_dir = default_run
    args = parse_args(["--model_name_or_path", str(moe_dir), "--data_path", "unused.json", "--output_dir", "unused",
                       "--use_cpu", "True", "--use_lora", "--lora_weight_path", str(output_dir)])
    model = load_model(plan_run(*args)[0], args[3])
    assert adapted_modules(model) == DEFAULT_ADAPTED[model.config.model_type]
    layer = model.base_model.model.model.layers[0]
    assert layer.self_attn.q_proj.lora_dropout["default"].p == 0.05


def test_padding_free_rows_get_the_padded_batchs_loss_aux_loss_and_gradients(moe_dir, moe_data):
    """The toolkit's loss (CE + router_aux_loss_coef x aux) on the padding-free row PaddingFreeCollator builds, with
    per-sample attention, equals the padded batch's: the load-balancing loss counts the same (real) tokens."""
    from chatft.data.datasets import ChatCollator, PaddingFreeCollator, SupervisedDataset, load_samples
    from chatft.model.attention import PER_SAMPLE_SDPA
    from chatft.train.losses import LossScale, SupervisedLoss, loss_weight_total

    tokenizer = transformers.AutoTokenizer.from_pretrained(moe_dir)
    dataset = SupervisedDataset(load_samples(moe_data), tokenizer, 64)
    features = [dataset[i] for i in range(4)]
    assert len({len(f["input_ids"]) for f in features}) > 1  # different lengths: the padded batch has padding
    model = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, attn_implementation="sdpa")
    model.set_attn_implementation(PER_SAMPLE_SDPA)  # as finetune.py trains: rows split per sample, padded rows masked
    loss = SupervisedLoss()
    loss.prepare(model)

    def terms_and_grads(batch):
        model.zero_grad()
        terms = loss(model, {**batch, "use_cache": False}, LossScale(tokens=int(loss_weight_total(batch))))
        terms.loss.backward()
        return terms, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    padded_batch = ChatCollator(tokenizer.pad_token_id)(features)
    assert (padded_batch["attention_mask"] == 0).any()
    padded, padded_grads = terms_and_grads(padded_batch)
    flat, flat_grads = terms_and_grads(PaddingFreeCollator()(features))
    bound = dict(terms=decoder_terms(model.config, loss=True))
    aux_bound = dict(terms=decoder_terms(model.config))  # the router's logits: forward sums only, no vocabulary
    assert_close_up_to_rounding(flat.logs["aux_loss"], padded.logs["aux_loss"], **aux_bound)
    assert_close_up_to_rounding(flat.logs["lm_loss"], padded.logs["lm_loss"], **bound)
    assert_close_up_to_rounding(flat.loss, padded.loss, **bound)
    # the aux term is far above the rounding: an aux loss that counted padding would differ
    assert model.config.router_aux_loss_coef * padded.logs["aux_loss"] > 100 * rounding_atol(padded.loss, **bound)
    assert padded_grads.keys() == flat_grads.keys() and any("mlp.gate.weight" in name for name in padded_grads)
    for name, grad in padded_grads.items():
        assert_close_up_to_rounding(flat_grads[name], grad, **bound)
    # the aux loss as the model computes it without a mask, padding counted: not what the padded batch gives
    with torch.no_grad():
        unmasked = model(**{k: v for k, v in padded_batch.items() if k not in ("labels", "attention_mask")})
    assert abs(float(unmasked.aux_loss - padded.logs["aux_loss"])) > 10 * rounding_atol(padded.logs["aux_loss"], **aux_bound)


def test_padding_free_training_takes_the_padded_runs_steps(moe_data, tmp_path):
    """finetune.py, LoRA on the experts, padded and padding-free: the same loss (aux loss included) each step. (One
    architecture: the in-process test above covers both.)"""
    moe_dir = build_tiny_moe(tmp_path, "qwen3_moe")
    flags = ["--use_lora", "--lora_r", "4", "--learning_rate", "1e-2", "--lora_dropout", "0", "--seed", "3"]
    padded = run(moe_dir, moe_data, tmp_path / "padded", *flags, "--padding_free", "False")
    padding_free = run(moe_dir, moe_data, tmp_path / "padding-free", *flags)
    curves = [[(entry["loss"], entry["aux_loss"]) for entry in trainer.state.log_history if "loss" in entry]
              for trainer in (padded, padding_free)]
    assert len(curves[0]) == len(curves[1]) == 3
    terms = decoder_terms(padded.model.config, loss=True)
    for (loss, aux), (expected_loss, expected_aux) in zip(curves[1], curves[0]):
        # logged values are rounded to 4 decimals (transformers' and chatft's logs)
        assert loss == pytest.approx(expected_loss, abs=1e-4 + rounding_atol(expected_loss, terms=terms))
        assert aux == pytest.approx(expected_aux, abs=1e-4 + rounding_atol(expected_aux, terms=terms))
    assert curves[0][0] != curves[0][2]  # it trained


def test_moe_blocks_are_found_for_zero3_leaves(moe_dir):
    from chatft.model.load import moe_block_classes

    model = transformers.AutoModelForCausalLM.from_pretrained(moe_dir)
    expected = {"qwen2_moe": "Qwen2MoeSparseMoeBlock", "qwen3_moe": "Qwen3MoeSparseMoeBlock"}[model.config.model_type]
    assert [cls.__name__ for cls in moe_block_classes(model)] == [expected]
    dense = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "qwen3", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8))
    assert moe_block_classes(dense) == []


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_lora_two_processes_equal_one(moe_data, tmp_path):
    """ZeRO-3, default MoE LoRA (experts adapted), qwen3_moe: 2 processes x batch 2 take the steps of 1 process x batch 2
    x accumulation 2 (the same micro-batches: the aux loss is a mean per micro-batch), each MoE block registered as
    one ZeRO-3 leaf, the memory estimate given, and both runs exit 0."""
    import json

    import safetensors.torch
    from test_distributed import common_flags, losses, torchrun

    moe_dir = build_tiny_moe(tmp_path, "qwen3_moe")
    flags = ["--per_device_train_batch_size", "2", "--use_lora", "--lora_r", "4", "--lora_dropout", "0",
             "--deepspeed", "ds_config_zero3.json"]
    one, two = tmp_path / "one", tmp_path / "two"
    logs = [torchrun(1, "finetune.py", *common_flags(moe_dir, moe_data, one, *flags, "--gradient_accumulation_steps",
                                                    "2")),
            torchrun(2, "finetune.py", *common_flags(moe_dir, moe_data, two, *flags))]
    for result, processes in zip(logs, (1, 2)):
        log = result.stdout + result.stderr
        assert log.count("ZeRO-3: Qwen3MoeSparseMoeBlock gathered as whole modules") == processes, log[-3000:]
        assert "memory estimate: not available" not in log and "memory estimate: ~" in log, log[-3000:]
        # experts found under zero.Init (empty partitions): adapted, and their load in the summary
        assert log.count("LoRA on k_proj, o_proj, q_proj, v_proj, mlp.experts.down_proj, mlp.experts.gate_up_proj") \
            == processes, log[-3000:]
        assert log.count("expert load") == 1, log[-3000:]
    # the same micro-batches routed: the expert load is summed over both processes, not rank 0's half
    load_one, load_two = ([line for line in (r.stdout + r.stderr).splitlines() if "expert load" in line][0]
                          for r in logs)
    assert load_one.split("expert load", 1)[1] == load_two.split("expert load", 1)[1]
    curve_one, curve_two = losses(one), losses(two)
    assert len(curve_one) == len(curve_two) == 3
    terms = decoder_terms(transformers.AutoConfig.from_pretrained(moe_dir), loss=True)
    for (loss_one, lr_one), (loss_two, lr_two) in zip(curve_one, curve_two):
        assert_close_up_to_rounding(loss_two, loss_one, terms=terms)
        assert lr_one == pytest.approx(lr_two)
    # lm_loss and aux_loss are logged as the step's, over both processes (logged to 4 decimals)
    parts_one, parts_two = ([(e["lm_loss"], e["aux_loss"]) for e in json.loads((path / "trainer_state.json").read_text())[
        "log_history"] if "loss" in e] for path in (one, two))
    for (lm_one, aux_one), (lm_two, aux_two), (loss, _) in zip(parts_one, parts_two, curve_one):
        assert lm_two == pytest.approx(lm_one, abs=2e-4) and aux_two == pytest.approx(aux_one, abs=2e-4)
        assert lm_one + 0.25 * aux_one == pytest.approx(loss, abs=2e-4)
    final_one, final_two = (safetensors.torch.load_file(path / "adapter_model.safetensors") for path in (one, two))
    assert final_one.keys() == final_two.keys() and any("experts" in name for name in final_one)
    for name in final_one:
        assert_close_up_to_rounding(final_two[name], final_one[name], terms=terms,
                                    magnitude=final_one[name].abs().max() + 3e-3)

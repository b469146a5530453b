"""Q-LoRA: LoRA on a 4-bit base. NF4 (bitsandbytes, quantized on load) on tiny models, and the
combinations that cannot work, refused before training starts."""

import json

import peft
import safetensors.torch
import pytest
import torch
import transformers

import finetune
from support import (ROOT, assert_close_up_to_rounding, decoder_terms, make_non_chatml_model, probe_logits, run,
                     unloadable_copy)


def nf4_config():
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.bfloat16)


def test_nf4_qlora_trains_only_lora_and_reloads(tiny_qwen_arch_64_dir, data_file, tmp_path):
    trainer = run(tiny_qwen_arch_64_dir, data_file, tmp_path / "out", "--use_lora", "--q_lora", "--lora_r", "4",
                  "--bf16", "True", "--activation_checkpointing", "--learning_rate", "1e-2")
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        name for name, _ in model.named_parameters() if "lora_" in name}
    config = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == str(tiny_qwen_arch_64_dir)  # the full-precision original
    # the base quantized again the same way + the adapter = the model at the end of training
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_arch_64_dir, quantization_config=nf4_config(),
                                                             device_map={"": "cpu"}, dtype=torch.bfloat16)
    before = probe_logits(base, trainer.processing_class)
    base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)  # fp32 norms, as in training
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    # Not exact, and not a reordering: bitsandbytes repacks 4-bit weights at a model's first inference forward (CPUs
    # with AVX512-bf16), here (`before`) ahead of prepare_model_for_kbit_training, in the trained model after it, and
    # the two then differ by bf16 rounding (without `before` they agree exactly): about one bf16 step, 2^-8..2^-7
    # relative (0.6% of the largest logit seen). 0.01 + 1% of each logit, well under the 0.1 training moved them.
    torch.testing.assert_close(probe_logits(reloaded, tokenizer), probe_logits(model, tokenizer), atol=1e-2, rtol=1e-2)
    assert (before - probe_logits(reloaded, tokenizer)).abs().max() > 0.1


def refused(argv, capsys):
    code = finetune.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--deepspeed", str(ROOT / "ds_config_zero3.json")], "--q_lora cannot run under DeepSpeed ZeRO-3"),
    (["--fsdp", "full_shard auto_wrap"], "--q_lora cannot run under FSDP"),
])
def test_refused_engines(tiny_qwen_arch_64_dir, data_file, tmp_path, capsys, extra, message):
    code, err = refused(["--model_name_or_path", str(tiny_qwen_arch_64_dir), "--data_path", data_file, "--output_dir",
                         str(tmp_path / "out"), "--use_lora", "--q_lora", "--use_cpu", "True", *extra], capsys)
    assert code == 2 and message in err and not (tmp_path / "out").exists()


def test_q_lora_needs_use_lora(tiny_qwen_arch_64_dir, data_file, tmp_path, capsys):
    code, err = refused(["--model_name_or_path", str(tiny_qwen_arch_64_dir), "--data_path", data_file, "--output_dir",
                         str(tmp_path / "out"), "--q_lora", "--use_cpu", "True"], capsys)
    assert code == 2 and "--q_lora needs --use_lora" in err


def test_refused_when_chatml_tokens_must_be_added(tmp_path, data_file, capsys):
    # the refusal reads the tokenizer (it lacks the ChatML tokens) and must come before the weights load, which fail
    base_dir = unloadable_copy(make_non_chatml_model(tmp_path, tie=False), tmp_path, keep_tokenizer=True)
    code, err = refused(["--model_name_or_path", str(base_dir), "--data_path", data_file, "--output_dir",
                         str(tmp_path / "out"), "--use_lora", "--q_lora", "--use_cpu", "True"], capsys)
    assert code == 2 and "embeddings cannot learn new tokens" in err and "drop --q_lora" in err
    assert not (tmp_path / "out").exists()


def test_gptq_qlora_trains_only_lora_and_reloads(tiny_gptq_dir, data_file, tmp_path):
    assert json.load(open(tiny_gptq_dir / "config.json"))["quantization_config"]["quant_method"] == "gptq"
    # fp32 compute: the gptqmodel kernels de-quantize to the input's dtype, so the reload is exact
    trainer = run(tiny_gptq_dir, data_file, tmp_path / "out", "--use_lora", "--q_lora", "--lora_r", "4",
                  "--learning_rate", "1e-2", "--lora_dropout", "0")
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "GPTQLoraLinear" and type(q_proj.base_layer).SUPPORTS_TRAINING
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        name for name, _ in model.named_parameters() if "lora_" in name}
    original = safetensors.torch.load_file(next(tiny_gptq_dir.glob("*.safetensors")))
    trained_buffers = {name.split("base_model.model.", 1)[1].replace(".base_layer", ""): buffer
                       for name, buffer in model.named_buffers() if name.endswith(".qweight")}
    assert trained_buffers and all(torch.equal(buffer, original[name]) for name, buffer in trained_buffers.items())
    assert set(json.load(open(tmp_path / "out" / "adapter_config.json"))["target_modules"]) >= {"q_proj", "down_proj"}
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_gptq_dir, device_map={"": "cpu"}, dtype=torch.float32,
        quantization_config=transformers.GPTQConfig(bits=4, backend="auto_trainable"))
    base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    # the same fp32 computation on the same int4 weights; only kernel sum order may differ (observed: identical)
    assert_close_up_to_rounding(probe_logits(reloaded, tokenizer), probe_logits(model, tokenizer),
                                terms=decoder_terms(base.config))

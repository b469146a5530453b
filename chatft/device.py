"""Which precision a device computes in: the one home of the dtype policy, for training and for inference.

    python -m chatft.device    # e.g. "--bf16 True" on a recent GPU, "--bf16 True --use_cpu True" on an AMX CPU

Training reads its precision from the flags (`compute_dtype`); the launchers ask `device_flags` which flags to pass;
loading a model for chat or for measuring perplexity asks `inference_device_and_dtype`.
"""

import sys

from chatft import console

if __name__ == "__main__":  # before the libraries are imported: they look at what is installed when imported
    console.start()

import torch  # noqa: E402


def compute_dtype(training_args) -> torch.dtype:
    """The dtype training computes in, from --bf16/--fp16 (the Trainer autocasts to it); fp32 without either."""
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def cuda_half_dtype(gptq: bool = False) -> torch.dtype:
    """The 16-bit type a GPU computes in: bf16 where it supports it, else fp16; fp16 for GPTQ kernels, which compute
    in it."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() and not gptq else torch.float16


def inference_device_and_dtype(gptq: bool = False) -> tuple[str, torch.dtype]:
    """CUDA in its 16-bit type (cuda_half_dtype); the CPU in fp32 (no autocast when generating, so bf16 weights
    would round every operation; and perplexities compared on the CPU stay free of rounding)."""
    if torch.cuda.is_available():
        return "cuda", cuda_half_dtype(gptq)
    return "cpu", torch.float32


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower than fp32."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def gptq_compute_dtype() -> torch.dtype | None:
    """The dtype gptqmodel quantizes in: its own choice (None: bf16 on a CPU) on a GPU and on a CPU with native bf16;
    fp32 on other CPUs, where its emulated bf16 made the demo's 4-bit GPTQ 1.7x slower (692 s vs 416 s, 2-core EPYC)."""
    return None if torch.cuda.is_available() or cpu_computes_bf16() else torch.float32


def device_flags() -> str:
    """bf16 where the device computes it natively, else fp16 on GPU and fp32 on CPU; --use_cpu without CUDA."""
    if torch.cuda.is_available():
        return "--bf16 True" if cuda_half_dtype() == torch.bfloat16 else "--fp16 True"
    # On the CPU bf16 autocast only pays with native bf16 matmuls (AVX512-BF16 or AMX).
    return ("--bf16 True " if cpu_computes_bf16() else "") + "--use_cpu True"


if __name__ == "__main__":
    sys.exit(console.run_entry_point(lambda _: console.print_value(device_flags)))

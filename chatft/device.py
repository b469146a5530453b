"""The device flags the launchers pass to finetune.py, printed for shell scripts.

    python -m chatft.device    # e.g. "--bf16 True" on a recent GPU, "--bf16 True --use_cpu True" on an AMX CPU
"""

import sys

from chatft import console

if __name__ == "__main__":  # before the libraries are imported: they look at what is installed when imported
    console.start()

import torch  # noqa: E402


def device_flags() -> str:
    """bf16 where the device computes it natively, else fp16 on GPU and fp32 on CPU; --use_cpu without CUDA."""
    if torch.cuda.is_available():
        return "--bf16 True" if torch.cuda.is_bf16_supported() else "--fp16 True"
    # On the CPU bf16 autocast only pays with native bf16 matmuls (AVX512-BF16 or AMX).
    return ("--bf16 True " if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "") + "--use_cpu True"


if __name__ == "__main__":
    sys.exit(console.run_entry_point(lambda _: console.print_value(device_flags)))

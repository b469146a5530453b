"""chatft.device: the one dtype policy, for the training flags, the launchers' flags and inference."""

from types import SimpleNamespace

import pytest
import torch

from chatft import device


@pytest.mark.parametrize("bf16, fp16, expected", [(True, False, torch.bfloat16), (False, True, torch.float16),
                                                  (False, False, torch.float32)])
def test_compute_dtype_from_the_flags(bf16, fp16, expected):
    assert device.compute_dtype(SimpleNamespace(bf16=bf16, fp16=fp16)) == expected


@pytest.mark.parametrize("bf16_supported, gptq, expected", [(True, False, torch.bfloat16), (False, False, torch.float16),
                                                            (True, True, torch.float16)])
def test_a_gpu_computes_in_bf16_where_it_can(monkeypatch, bf16_supported, gptq, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert device.inference_device_and_dtype(gptq) == ("cuda", expected)
    assert device.device_flags() == ("--bf16 True" if bf16_supported else "--fp16 True")
    assert device.gptq_compute_dtype() is None  # gptqmodel's own choice on a GPU


def test_the_cpu_infers_in_fp32_and_trains_in_bf16_only_natively(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.inference_device_and_dtype() == device.inference_device_and_dtype(gptq=True) == ("cpu", torch.float32)
    for native, flags in ((True, "--bf16 True --use_cpu True"), (False, "--use_cpu True")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert device.device_flags() == flags
        # gptqmodel quantizes in bf16 on a CPU: kept where it is native, fp32 where bf16 would be emulated
        assert device.gptq_compute_dtype() == (None if native else torch.float32)

"""Run finetune.train under torchrun, then (rank 0) dump the ZeRO-3-gathered weights as they are at the
end of training, so a test can compare them with what was saved and reloaded.

    torchrun --nproc_per_node 2 tests/helpers/zero3_roundtrip.py GATHERED.safetensors finetune.py-flags...
"""

import sys
from pathlib import Path

import deepspeed
import safetensors.torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import finetune  # noqa: E402

gathered_path, argv = sys.argv[1], sys.argv[2:]
trainer = finetune.train(argv)
parameters = list(trainer.model.named_parameters())
with deepspeed.zero.GatheredParameters([p for _, p in parameters]):
    if trainer.is_world_process_zero():
        safetensors.torch.save_file({name: p.detach().clone().contiguous() for name, p in parameters}, gathered_path)

"""The LoRA variants peft offers, as finetune.py's flags: DoRA, rsLoRA, how the adapter starts (--lora_init), and
what a start that rewrites the base weights (PiSSA, OLoRA) needs when the adapter is saved.

PiSSA and OLoRA move the adapter's starting product out of each adapted weight (W_res = W - s·B0·A0) and train B, A
from B0, A0: the trained layer computes W_res + s·B·A. Saved as is, the adapter is right only on W_res, which no file
holds. `as_plain_lora` rewrites the saved adapter as a plain LoRA of twice the rank on the original W:
s·[B | -B0]·[A ; A0] = s·(B·A - B0·A0), so merging, exporting and loading it with peft on the base model give what
training computed. It is peft's own conversion (save_pretrained's `path_initial_model_for_weight_conversion`),
done on the saved files: peft's keeps only the lora_A/lora_B tensors (it would drop trained embeddings) and
reloads a second adapter into the live model.
"""

from __future__ import annotations

import json
import os
import re

import torch

from chatft.model.sources import ADAPTER_CONFIG_FILE

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# the PeftModel attribute holding a PiSSA/OLoRA run's starting adapter (wrap_lora sets it, save_run reads it)
STARTING_ADAPTER_ATTRIBUTE = "chatft_starting_adapter"

# --lora_init values: peft's init_lora_weights, those that need nothing beyond the model
LORA_INITS = ("default", "gaussian", "olora", "pissa", "pissa_niter_N")
# peft's other starts, and what each needs that a flag cannot give
LORA_INITS_NEEDING_MORE = {
    "loftq": "a LoftQ config (it quantizes the base model itself)",
    "eva": "the training data's activations (an EVA config)",
    "corda": "calibration data (a CorDA config)",
    "lora_ga": "the training data's gradients (a LoRA-GA config)",
}


def peft_init_lora_weights(lora_init: str) -> bool | str:
    """--lora_init as peft's `init_lora_weights`: default -> True (B = 0, the adapter starts as a no-op); gaussian,
    olora, pissa, pissa_niter_<n> as they are."""
    return True if lora_init.lower() in ("default", "true") else lora_init.lower()


def lora_init_problem(lora_init: str) -> str | None:
    """Why --lora_init cannot be used, or None. pissa_niter_<n>: fast-SVD PiSSA with n subspace iterations."""
    value = lora_init.lower()
    if value in ("default", "true", "gaussian", "olora", "pissa") or re.fullmatch(r"pissa_niter_\d+", value):
        return None
    if value in LORA_INITS_NEEDING_MORE:
        return f"--lora_init {lora_init} needs {LORA_INITS_NEEDING_MORE[value]}, which finetune.py does not take."
    return f"--lora_init must be one of {', '.join(LORA_INITS)} (N: subspace iterations, e.g. pissa_niter_4), " \
           f"not {lora_init!r}."


def rewrites_base_weights(init_lora_weights) -> bool:
    """Whether peft's start `init_lora_weights` subtracts the adapter's starting product from the base weights."""
    return str(init_lora_weights).lower().startswith(("pissa", "olora"))


def starting_adapter(model) -> dict[str, torch.Tensor]:
    """The lora_A/lora_B tensors of a freshly initialised PeftModel, on the CPU, keyed as in the saved adapter."""
    import peft

    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in peft.get_peft_model_state_dict(model).items()
            if ".lora_A." in name or ".lora_B." in name}


def as_plain_lora(adapter_dir: str | os.PathLike, start: dict[str, torch.Tensor]) -> None:
    """Rewrite the adapter saved in `adapter_dir` (trained from `start`, a PiSSA/OLoRA start) as a plain LoRA of
    the original base weights: rank and alpha doubled (the scale alpha/r, or alpha/sqrt(r) with rsLoRA, kept),
    A stacked over A0, B beside -B0, init_lora_weights true. Every other saved tensor is kept as it is."""
    from safetensors.torch import load_file, save_file

    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_FILE)
    state = load_file(weights_path)
    missing = [name for name in start if name not in state]
    if missing:  # the saved keys come from the same function: a mismatch is a bug, not a user's mistake
        raise RuntimeError(f"{weights_path} lacks {missing[0]} (and {len(missing) - 1} more) of the adapter's start")
    for name, initial in start.items():
        trained = state[name]
        if ".lora_A." in name:
            state[name] = torch.cat([trained, initial.to(trained.dtype)], dim=0)
        else:
            state[name] = torch.cat([trained, -initial.to(trained.dtype)], dim=1)
    save_file(state, weights_path, metadata={"format": "pt"})
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG_FILE)
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["r"] *= 2
    config["lora_alpha"] *= 2 ** 0.5 if config.get("use_rslora") else 2
    config["init_lora_weights"] = True
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)

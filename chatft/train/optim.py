"""LoRA+ (Hayou et al., 2024): the B matrices of LoRA train at a higher learning rate than the A matrices.

Applied to the optimizer transformers built (`ChatTrainer.create_optimizer`), before the learning-rate schedule
is made from it: each of transformers' parameter groups (weight decay or none, as transformers chose them) gives
its lora_B parameters to a new group with the same settings and lr × ratio, so the schedule scales both alike.
"""

from __future__ import annotations

import torch


def is_lora_b(name: str) -> bool:
    """Whether a parameter name (e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight)
    is a LoRA B matrix."""
    return ".lora_B." in name or ".lora_embedding_B." in name


def raise_lora_b_learning_rate(optimizer: torch.optim.Optimizer, model: torch.nn.Module, ratio: float) -> int:
    """Move the trainable lora_B parameters of every param group of `optimizer` into a group of their own at
    `ratio` times its learning rate (weight decay and the other settings kept). Returns how many moved.

    >>> # groups [{lr: 1e-4, weight_decay: 0.1, params: [A, B]}] -> [{..., params: [A]}, {lr: 1.6e-3, ..., params: [B]}]
    """
    lora_b = {id(p) for name, p in model.named_parameters() if p.requires_grad and is_lora_b(name)}
    new_groups = []
    for group in optimizer.param_groups:
        moving = [p for p in group["params"] if id(p) in lora_b]
        if moving:
            group["params"] = [p for p in group["params"] if id(p) not in lora_b]
            settings = {key: value for key, value in group.items() if key != "params"}
            new_groups.append({**settings, "params": moving, "lr": group["lr"] * ratio})
    for group in new_groups:
        optimizer.add_param_group(group)
    return sum(len(group["params"]) for group in new_groups)

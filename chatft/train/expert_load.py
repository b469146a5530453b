"""Expert load of a mixture-of-experts model through a run: how many tokens each layer's router sent to each expert,
so that a collapsed router (a few experts taking most tokens) shows at the end of the run.

Counted with public forward hooks: every fused experts module of transformers 5 (`experts`, called as
experts(hidden_states, top_k_index, top_k_weights)) receives the router's choices, and the model's own forward its
attention_mask, so padding is left out. Training forwards only (evaluation is not counted); a forward recomputed by
activation checkpointing counts twice, in every layer alike, so the shares are unchanged. In a multi-process run the
counts are summed over all processes at the end, so the summary describes the whole run, not rank 0's share of it.
"""

from __future__ import annotations

import torch
import transformers


def experts_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every fused experts module: a module named `experts` holding 3-D parameters (itself, or
    through peft's adapter wrappers, which take its name and keep it below as `base_layer`)."""
    return [(name, module) for name, module in model.named_modules()
            if name.split(".")[-1] == "experts" and any(len(shape(p)) == 3 for p in module.parameters())]


def shape(parameter) -> tuple[int, ...]:
    """Under ZeRO-3 a parameter is an empty partition; its shape is DeepSpeed's `ds_shape`."""
    return tuple(getattr(parameter, "ds_shape", parameter.shape))


class ExpertLoad(transformers.TrainerCallback):
    """Tokens per expert, per MoE layer, over the real tokens of the training forwards (of all processes)."""

    def __init__(self, model):
        self.counts: list[torch.Tensor] = []
        self.layers: list[str] = []  # each experts module's decoder layer (its name's number)
        self.mask: torch.Tensor | None = None
        self.handles = [model.register_forward_pre_hook(self.keep_mask, with_kwargs=True)]
        for index, (name, module) in enumerate(experts_modules(model)):
            self.layers.append(next((part for part in reversed(name.split(".")) if part.isdigit()), name))
            experts = next(shape(p) for p in module.parameters() if len(shape(p)) == 3)[0]
            # one slot more: index `experts` is "no expert" in transformers' experts code (skipped there, dropped here)
            self.counts.append(torch.zeros(experts + 1, dtype=torch.long))
            self.handles.append(module.register_forward_pre_hook(self.counter(index), with_kwargs=True))

    @classmethod
    def attach(cls, model) -> ExpertLoad | None:
        """An ExpertLoad counting on `model`, or None for a model without fused experts."""
        return cls(model) if experts_modules(model) else None

    def keep_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.mask = mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def counter(self, index: int):
        def count(module, args, kwargs):
            if not module.training:
                return
            choices = (args[1] if len(args) > 1 else kwargs["top_k_index"]).detach()
            real = torch.ones_like(choices)
            if self.mask is not None and self.mask.numel() == choices.shape[0]:
                real = self.mask.to(choices.device)[:, None].expand_as(choices).long()
            # on the experts' device, with index_add_: no host synchronization per layer (bincount and masking have one)
            counts = self.counts[index].to(choices.device)
            self.counts[index] = counts.index_add_(0, choices.reshape(-1), real.reshape(-1))
        return count

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # every process ends training, so every process joins; on the Trainer's device, which its backend reduces
            flat = torch.cat([c.to(args.device) for c in self.counts])
            torch.distributed.all_reduce(flat)
            self.counts = [part.cpu() for part in flat.split([len(c) for c in self.counts])]

    def tokens_per_expert(self) -> list[torch.Tensor]:
        """Per MoE layer, the tokens routed to each expert (a token counts once in each of its top-k experts)."""
        return [c[:-1].cpu() for c in self.counts]

    def text(self) -> str | None:
        """One line for the run's summary: per layer the busiest expert's share of the routings (tokens x top-k), its
        mean over layers and its worst layer, the least used expert's share; None when no token was counted."""
        counted = [(layer, c.double() / c.sum()) for layer, c in zip(self.layers, self.tokens_per_expert())
                   if c.sum() > 0]
        if not counted:
            return None
        shares = [s for _, s in counted]
        busiest = [s.max().item() for s in shares]
        worst = max(range(len(busiest)), key=busiest.__getitem__)
        experts = len(shares[0])
        least = min(s.min().item() for s in shares)
        return (f"busiest expert {sum(busiest) / len(busiest):.3f} of routed tokens (mean of {len(shares)} layers; "
                f"worst {busiest[worst]:.3f} in layer {counted[worst][0]}), least used {least:.3f}; "
                f"uniform {1 / experts:.3f} ({experts} experts)")

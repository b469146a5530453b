"""Training memory, estimated before any of it is spent: from the run's plan (the model's config and what the flags
decided) alone.

    >>> estimate = estimate_training_memory(RunPlan(config=config, mode="lora", compute_dtype=torch.bfloat16), 1024)
    >>> print(estimate.text())
    memory estimate: ~0.9 GiB peak (weights 0.3 GiB, gradients 0.1 GiB, optimizer 0.1 GiB, activations 0.4 GiB at the
    longest batch of 1,024 tokens)

A pure estimator: it reads a chatft.plan.RunPlan's fields (mode, compute_dtype, quantization, gptq_bits,
gptq_group_size, shard, world_size, train_embeddings, vocab_size, lora_r, lora_targets, lora_target_parameters,
lora_dropout, activation_checkpointing, labelled_logits_only, sequence_parallel_size; config and trust_remote_code
to build the model's shape) and imports nothing from chatft, so that it cannot decide anything the plan decides.

The peak is taken as the sum of four parts, each in bytes, matching what chatft.model.load.load_model and
chatft.train.trainer.ChatTrainer hold:

- weights, in their storage dtype: full-parameter training keeps fp32 master weights (the Trainer autocasts to
  bf16/fp16); LoRA keeps the frozen base in the compute dtype and its adapters (and trainable embedding copies) in
  fp32; Q-LoRA keeps the decoder's linear layers in 4 bits (NF4 with double-quantized scales: 0.5 byte per weight,
  one 8-bit absmax per 64 and one fp32 per 64 x 256; GPTQ: packed weights, zeros, fp16 scales per group, g_idx)
  and everything else in fp32 (peft's prepare_model_for_kbit_training upcasts it), but for a MoE model's routed
  experts under NF4: not 4-bit (bitsandbytes quantizes linear layers only) and kept in the compute dtype. DPO/KTO
  add their frozen reference (the plan's `reference`): a full-parameter run's copy of the model (fp32; under ZeRO-3
  partitioned like the weights, in its DeepSpeed engine's dtype, the compute dtype), or the starting adapter's
  second copy (--lora_weight_path); none when precomputed or the adapter off.
  Under DeepSpeed's bf16/fp16 (ZeRO-1/2/3, not Q-LoRA) the whole model is cast to the compute dtype, and the fp32
  master copy of the trainable parameters lives in the optimizer (counted there).
- gradients: 4 bytes per trainable parameter (trainable parameters are fp32 in every mode).
- optimizer: AdamW's two fp32 states per trainable parameter (and DeepSpeed's fp32 master copy in bf16/fp16).
  DeepSpeed ZeRO-1 divides the optimizer state by the number of processes, ZeRO-2 and FSDP's shard_grad_op also the
  gradients, ZeRO-3 and FSDP's full_shard the weights too.
- activations at the longest batch (`activation_bytes`): what autograd keeps per token and layer (derived from
  hidden, intermediate, heads, key/value heads and head_dim, below), the weights' compute-dtype copies that autocast
  caches during the forward pass, the adapted copies of fused expert weights (`adapted_bare_bytes`), and the loss's
  working set. A mixture-of-experts layer's activations are its router's and, per token, top-k routed copies through
  the experts' width (`moe_layer_activation_bytes`), not a dense MLP's of the config's intermediate size.
  With sequence parallelism over N processes (DeepSpeed Ulysses) each process holds the activations of 1/N of the
  row: outside attention its shard of the tokens, inside it the whole row for 1/N of the heads, the same bytes.

It is an upper bound in one respect: gradients are set to None between steps (the Trainer's zero_grad), so they and
the forward pass's activations never fully coexist; the backward pass frees activations layer by layer as gradients
appear. Everything outside tensors is left out: CUDA's allocator rounding and workspaces, and on the CPU what the
process holds besides (see `activation_bytes` and bench.profile_table for what the estimate is compared to).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from dataclasses import dataclass, field

import torch
import transformers

logger = logging.getLogger(__name__)

# Bytes per trainable parameter
GRADIENT_BYTES = 4  # fp32 in every mode (chatft.model.load.wrap_lora upcasts LoRA's trainable weights)
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq, fp32
# NF4 with double quantization: 4 bits, an 8-bit absmax per block of 64, an fp32 scale per 256 such blocks
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
LOGITS_PER_CHUNK = 1 << 25  # chatft.train.losses.LOGITS_PER_CHUNK (not imported: the estimator imports nothing of the toolkit)
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak training memory in bytes, by part; `total` is their sum. `tokens`: the batch the activations are for."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    tokens: int
    trainable_params: int = field(default=0, compare=False)
    sequence_parallel_size: int = 1  # the row split across this many processes (activations are for 1/N of it)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def text(self) -> str:
        gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
        return (f"memory estimate: ~{gib(self.total)} peak (weights {gib(self.weights)}, gradients "
                f"{gib(self.gradients)}, optimizer {gib(self.optimizer)}, activations {gib(self.activations)} at the "
                f"longest batch of {self.tokens:,} tokens{self.split_text()})")

    def split_text(self) -> str:
        if self.sequence_parallel_size == 1:
            return ""
        return f", 1/{self.sequence_parallel_size} of it a process with sequence parallelism"


@dataclass(frozen=True)
class ModelShape:
    """What the estimate reads from a model: its sizes, and parameter counts from its module tree (built on the meta
    device: no memory, no weights). Counts are exact for any architecture; the activation formula assumes a
    Llama/Qwen-style decoder layer (RMSNorm, attention with rotary embeddings, gated MLP)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int  # every parameter (tied ones once)
    embedding_params: int  # input embedding and output layer (once if tied)
    head_params: int  # the output layer's weight
    linears: tuple[tuple[str, int, int], ...]  # (short name, in, out) of every linear layer but the output layer
    # (qualified name, shape) of every 2-D/3-D parameter outside linear and embedding layers: what peft's
    # target_parameters can adapt (a mixture-of-experts model's fused experts [experts, out, in] and routers)
    bare: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # mixture-of-experts layers (modules holding an `experts` child): how many, routed experts per layer, experts per
    # token, one expert's width, and the shared expert's width (qwen2_moe; 0 for none); 0 moe_layers: a dense model
    moe_layers: int = 0
    experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0

    @classmethod
    def of(cls, config, vocab_size: int | None = None, trust_remote_code: bool = False) -> ModelShape:
        """`vocab_size`: the tokenizer's size; load_model resizes the embeddings to it when it is larger."""
        config = copy.deepcopy(config)
        if vocab_size and vocab_size > config.vocab_size:
            config.vocab_size = vocab_size
        with torch.device("meta"):  # the module tree alone: no memory, no weights
            model = causal_lm_class(config, trust_remote_code)(config)
        return cls.of_model(model, config)

    @classmethod
    def of_model(cls, model, config) -> ModelShape:
        """`model`: built from `config` (on the meta device), so its linear layers are torch's."""
        embeddings = {id(p): p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None for p in m.parameters()}
        head = model.get_output_embeddings()
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        moe_layers = sum(1 for m in model.modules() if "experts" in dict(m.named_children()))
        return cls(
            hidden=text.hidden_size, intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
            layers=text.num_hidden_layers, heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
            params=sum(p.numel() for p in model.parameters()), embedding_params=sum(embeddings.values()),
            head_params=head.weight.numel() if head is not None else 0,
            linears=tuple((name.split(".")[-1], m.in_features, m.out_features) for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and m is not head),
            bare=tuple((f"{module_name}.{name}" if module_name else name, tuple(p.shape))
                       for module_name, m in model.named_modules()
                       if not isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
                       for name, p in m.named_parameters(recurse=False) if p.dim() in (2, 3)),
            moe_layers=moe_layers,
            experts=(getattr(text, "num_experts", None) or getattr(text, "num_local_experts", 0)) if moe_layers else 0,
            top_k=getattr(text, "num_experts_per_tok", 0) if moe_layers else 0,
            expert_intermediate=getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", 0)
            if moe_layers else 0,
            shared_expert_intermediate=getattr(text, "shared_expert_intermediate_size", 0) or 0 if moe_layers else 0,
        )

    def adapted_bare(self, plan) -> list[tuple[int, ...]]:
        """Shapes of the parameters LoRA adapts through peft's target_parameters: plan.lora_target_parameters
        (matched as peft does, by name or dotted suffix), or when it is None the routed experts' fused weights
        (3-D parameters of a module named `experts`, as chatft.model.load.expert_parameter_names finds them)."""
        return [shape for _, shape in self.adapted_bare_named(plan)]

    def adapted_bare_named(self, plan) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of each parameter `adapted_bare` lists."""
        targets = plan.lora_target_parameters
        if targets is None:
            return [(name, shape) for name, shape in self.bare if is_expert(name, shape)]
        return [(name, shape) for name, shape in self.bare if any(name == t or name.endswith("." + t) for t in targets)]

    def expert_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the routed experts' fused weights (3-D parameters of a module named `experts`)."""
        return [shape for name, shape in self.bare if is_expert(name, shape)]

    def lora_params(self, plan) -> int:
        """r * (in + out) for every targeted linear layer (peft matches a target by the module's short name), and
        r * E * (in + out) for every adapted bare parameter of E experts (peft's ParamWrapper: lora_A in x r·E,
        lora_B r·E x out; a 2-D parameter is one expert)."""
        targets = set(plan.lora_targets) or {name for name, _, _ in self.linears}
        linear = sum(plan.lora_r * (i + o) for name, i, o in self.linears if name in targets)
        bare = sum(plan.lora_r * (shape[0] if len(shape) == 3 else 1) * sum(shape[-2:])
                   for shape in self.adapted_bare(plan))
        return linear + bare


def is_expert(name: str, shape: tuple[int, ...]) -> bool:
    """A routed experts' fused weight, as chatft.model.load.expert_parameter_names finds them."""
    return len(shape) == 3 and name.split(".")[-2:-1] == ["experts"]


def causal_lm_class(config, trust_remote_code: bool = False) -> type:
    """The class AutoModelForCausalLM.from_config would build for `config` (its own code's, with trust_remote_code).
    ModelShape constructs it directly: under ZeRO-3 (once a DeepSpeed stage-3 config is in the Trainer's arguments)
    from_config builds inside DeepSpeed's zero.Init, which partitions every parameter (numel 0) and then initializes
    weights that on the meta device have no data ("Cannot copy out of meta tensor")."""
    reference = (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if trust_remote_code and reference:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(reference, config.name_or_path)
    return transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def trainable_params(shape: ModelShape, plan) -> int:
    """Parameters with requires_grad after load_model: everything (less the embeddings with --train_embeddings false)
    for full-parameter training; adapters (plus one fp32 copy of the embeddings and output layer) for LoRA."""
    if plan.mode == "full":
        return shape.params - (0 if plan.train_embeddings else shape.embedding_params)
    return shape.lora_params(plan) + (shape.embedding_params if plan.train_embeddings else 0)


def weight_bytes(shape: ModelShape, plan, trainable: int) -> int:
    """The parameters as stored: fp32 master weights (full); base in the compute dtype plus fp32 trainable weights
    (LoRA); 4-bit linear layers, the rest upcast to fp32, plus fp32 trainable weights (Q-LoRA). Under DeepSpeed's
    bf16/fp16: every parameter in the compute dtype (deepspeed_casts_the_model)."""
    if deepspeed_casts_the_model(plan):
        return dtype_bytes(plan.compute_dtype) * (shape.params + (trainable if plan.mode == "lora" else 0))
    if plan.mode == "full":
        return 4 * shape.params
    if plan.mode == "lora":
        return dtype_bytes(plan.compute_dtype) * shape.params + 4 * trainable
    quantized = sum(i * o for _, i, o in shape.linears)
    # a MoE model's routed experts: not 4-bit under NF4 (bitsandbytes quantizes linear layers only), and kept in the
    # compute dtype, not upcast (chatft.model.load.unquantized_experts_kept_as_loaded)
    experts = sum(math.prod(s) for s in shape.expert_shapes()) if plan.quantization == "nf4" else 0
    if plan.quantization == "gptq":
        bits, group = plan.gptq_bits, plan.gptq_group_size
        # qweight and qzeros packed `bits` to a byte's 8, fp16 scales per group and output, int32 g_idx per input
        four_bit = sum(i * o * bits / 8 + math.ceil(i / group) * o * (bits / 8 + 2) + 4 * i for _, i, o in shape.linears)
    else:
        four_bit = quantized * NF4_BYTES_PER_WEIGHT
    return (int(four_bit) + dtype_bytes(plan.compute_dtype) * experts + 4 * (shape.params - quantized - experts)
            + 4 * trainable)


def layer_activation_bytes(shape: ModelShape, plan, moe: bool = False) -> int:
    """Bytes autograd keeps per token for one decoder layer, forward to backward (a Llama/Qwen layer under autocast);
    `moe`: a mixture-of-experts layer (its MLP: moe_layer_activation_bytes).

    a: the compute dtype's bytes; s: the residual stream's (fp32 for full-parameter and Q-LoRA, whose embeddings are
    fp32; the compute dtype for LoRA, whose base is loaded in it). Autocast casts an fp32 input once per linear layer,
    so an fp32 stream is kept as 3 compute-dtype copies for q/k/v and 2 for gate/up.
    - 2 RMSNorms: the fp32 input, the fp32 normalized hidden state, and the output in s: 2 * hidden * (8 + s)
    - q/k/v inputs, rotary embeddings (q and k and their rotate_half), attention and o_proj: sdpa's flash or
      memory-efficient kernel keeps q, k, v, its output and one fp32 log-sum-exp per head, no length^2 matrix (the
      kernels used on CUDA and by PyTorch's CPU sdpa; grouped-query attention runs on the key/value heads as they are)
    - MLP (dense_mlp_activation_bytes): gate/up inputs, gate's output, its SiLU, up's output, their product (down's
      input): 4 * intermediate * a
    - LoRA, per targeted layer: its input as lora_A's (in * a) and lora_A's output (r * a); with dropout also its
      mask and output (in * (1 + a))
    """
    a = dtype_bytes(plan.compute_dtype)
    s = a if plan.mode == "lora" else 4
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * shape.hidden * (8 + s)
    attention = ((3 if s != a else 1) * shape.hidden * a + 2 * (q + kv) * a + (2 * q + 2 * kv) * a
                 + 4 * shape.heads + q * a)
    mlp = moe_layer_activation_bytes(shape, plan) if moe else dense_mlp_activation_bytes(shape, plan, shape.intermediate)
    lora = 0
    if plan.mode != "full":
        per_layer = [(name, i, o) for name, i, o in shape.linears[: len(shape.linears) // max(shape.layers, 1)]]
        targets = set(plan.lora_targets) or {name for name, _, _ in shape.linears}
        lora = sum(i * a + plan.lora_r * a + (i * (1 + a) if plan.lora_dropout else 0)
                   for name, i, o in per_layer if name in targets)
    return norms + attention + mlp + lora


def dense_mlp_activation_bytes(shape: ModelShape, plan, intermediate: int) -> int:
    """A gated MLP of width `intermediate`, per token: its input (cast once per projection from an fp32 stream), gate's
    and up's outputs, SiLU's, their product."""
    a = dtype_bytes(plan.compute_dtype)
    s = a if plan.mode == "lora" else 4
    return (2 if s != a else 1) * shape.hidden * a + 4 * intermediate * a


def moe_layer_activation_bytes(shape: ModelShape, plan) -> int:
    """A mixture-of-experts MLP (transformers 5's fused experts, grouped_mm or eager: the same saved tensors), per token:
    - router: its input cast for the linear (fp32 stream), logits in the compute dtype and fp32 softmax per expert,
      top-k weights (fp32, renormalized) and indices (int64), the sort's permutation per routed copy;
    - each of the token's top_k routed copies, in the experts' weight dtype e (grouped_mm ignores autocast: the
      compute dtype for LoRA, whose base is loaded in it; fp32 for full-parameter master weights and Q-LoRA's upcast
      base): the gathered input (plus its cast from a stream of another dtype), gate_up's output (2 x expert width),
      SiLU's and the product (down's input), down's output (kept for the routing weight's product);
    - the shared expert, where there is one (qwen2_moe): a dense MLP of its width, and its sigmoid gate."""
    a = dtype_bytes(plan.compute_dtype)
    s = a if plan.mode == "lora" else 4
    e = a if plan.mode == "lora" else 4
    router = (shape.hidden * a if s != a else 0) + shape.experts * (a + 4) + shape.top_k * (4 + 4 + 8 + 8)
    routed = shape.top_k * ((2 * shape.hidden + 4 * shape.expert_intermediate) * e + (shape.hidden * e if s != e else 0))
    shared = 0
    if shape.shared_expert_intermediate:
        shared = dense_mlp_activation_bytes(shape, plan, shape.shared_expert_intermediate) + 2 * a + 4
    return router + routed + shared


def loss_bytes(shape: ModelShape, plan, tokens: int) -> int:
    """The loss's working set at its peak. Labelled logits (chatft.train.trainer): one chunk of at most 2^25 logits, as the
    matmul's compute-dtype output, its fp32 copy and the compute-dtype gradient; the labelled hidden states and their
    gradient; the output layer's fp32 gradient when it trains. Full logits (--labelled_logits_only False): the
    compute-dtype logits, their fp32 upcast and the log-softmax kept for the backward pass, for every token."""
    a = dtype_bytes(plan.compute_dtype)
    if not plan.labelled_logits_only:
        return tokens * shape.vocab * (a + 8)
    chunk = min(tokens, max(64, LOGITS_PER_CHUNK // shape.vocab))
    return (chunk * shape.vocab * (2 * a + 4) + 2 * tokens * shape.hidden * 4
            + (4 * shape.head_params if plan.train_embeddings else 0))


def autocast_copy_bytes(shape: ModelShape, plan, trainable: int) -> int:
    """The compute-dtype copies of fp32 weights that autocast caches through the forward pass (and the output
    layer's, made by the labelled-logits loss): every linear weight for full-parameter training, the adapters for
    LoRA; Q-LoRA's 4-bit layers are de-quantized one at a time (the largest layer, twice: forward and its input)."""
    a = dtype_bytes(plan.compute_dtype)
    if a == 4:
        return 0
    linear = sum(i * o for _, i, o in shape.linears)
    if plan.mode == "full":
        return a * (linear + shape.head_params)
    copies = a * trainable
    if plan.mode == "qlora":
        copies += a * (shape.head_params + 2 * max((i * o for _, i, o in shape.linears), default=0))
    return copies


def activation_bytes(shape: ModelShape, plan, tokens: int, trainable: int) -> int:
    """Activations at a batch of `tokens` tokens. With activation checkpointing each layer keeps only its input (the
    residual stream, hidden * s per token) and one layer's full set exists at a time, recomputed in the backward
    pass; without it every layer keeps its full set (a mixture-of-experts layer its own, moe_layer_activation_bytes).
    Plus the embedding output and final norm, the loss's working set and autocast's weight copies."""
    s = dtype_bytes(plan.compute_dtype) if plan.mode == "lora" else 4
    moe_layers = min(shape.moe_layers, shape.layers)
    dense, moe = layer_activation_bytes(shape, plan), layer_activation_bytes(shape, plan, moe=True) if moe_layers else 0
    if plan.activation_checkpointing:
        layers = shape.layers * shape.hidden * s + max(moe, dense if moe_layers < shape.layers else 0)
    else:
        layers = (shape.layers - moe_layers) * dense + moe_layers * moe
    outside = shape.hidden * (s + 8 + s)  # embedding output, final RMSNorm
    return (tokens * (layers + outside) + loss_bytes(shape, plan, tokens) + autocast_copy_bytes(shape, plan, trainable)
            + adapted_bare_bytes(shape, plan))


def adapted_bare_bytes(shape: ModelShape, plan) -> int:
    """peft's ParamWrapper computes an adapted bare parameter (fused experts) as a whole new tensor W + ΔW in W's
    dtype (the compute dtype; fp32 on Q-LoRA's upcast base, but for NF4's experts, kept in the compute dtype), which
    the experts' matmuls keep for the backward pass: every layer's without activation checkpointing, one layer's (its
    recomputation) with it."""
    if plan.mode == "full":
        return 0
    # Q-LoRA's upcast base is fp32: there only NF4's unquantized experts stay in the compute dtype
    in_compute_dtype = lambda name, s: (plan.mode == "lora"  # noqa: E731
                                        or (plan.quantization == "nf4" and is_expert(name, s)))
    total = sum(math.prod(s) * (dtype_bytes(plan.compute_dtype) if in_compute_dtype(name, s) else 4)
                for name, s in shape.adapted_bare_named(plan))
    return total // max(shape.layers, 1) if plan.activation_checkpointing else total


def deepspeed_casts_the_model(plan) -> bool:
    """DeepSpeed's bf16/fp16 mode casts the whole module, trainable parameters included, to the compute dtype and keeps
    the fp32 master copy of the trainable ones in its ZeRO optimizer (partitioned like the optimizer state) instead of
    the Trainer's fp32 weights under autocast. Q-LoRA's 4-bit layers are not cast; they keep weight_bytes' count."""
    return plan.shard in ("zero1", "zero2", "zero3") and dtype_bytes(plan.compute_dtype) == 2 and plan.mode != "qlora"


def estimate_training_memory(plan, tokens: int, shape: ModelShape | None = None) -> MemoryEstimate:
    """Peak training memory for the run `plan` describes (its config: nothing is loaded), at a batch of `tokens`
    tokens (the longest the run will see). See the module docstring for what each part holds."""
    shape = shape or ModelShape.of(plan.config, plan.vocab_size, plan.trust_remote_code)
    trainable = trainable_params(shape, plan)
    weights = weight_bytes(shape, plan, trainable)
    reference = getattr(plan, "reference", "none")  # a preference stage's frozen reference, held beside the model
    if reference == "copy" and plan.shard == "zero3":  # a second model, cast by its inference engine
        weights += dtype_bytes(plan.compute_dtype) * shape.params  # (divided by the processes with the weights)
    elif reference == "copy":  # full-parameter DPO/KTO: a second model, in the policy's storage dtype
        weights += 4 * shape.params
    elif reference == "adapter":  # --lora_weight_path under DPO/KTO: a second adapter (fp32, as peft loads it)
        weights += 4 * shape.lora_params(plan)
    gradients = GRADIENT_BYTES * trainable
    optimizer = ADAMW_STATE_BYTES * trainable
    if deepspeed_casts_the_model(plan):  # the trainable parameters' fp32 master copy, with the optimizer state
        optimizer += 4 * trainable
    n = max(plan.world_size, 1)
    split = max(getattr(plan, "sequence_parallel_size", 1), 1)
    if plan.shard in ("zero1", "zero2", "zero3", "fsdp_grad", "fsdp_full"):
        optimizer //= n
    if plan.shard in ("zero2", "zero3", "fsdp_grad", "fsdp_full"):
        gradients //= n
    if plan.shard in ("zero3", "fsdp_full"):
        weights //= n
    return MemoryEstimate(weights=int(weights), gradients=int(gradients), optimizer=int(optimizer),
                          activations=int(activation_bytes(shape, plan, -(-tokens // split), trainable)),
                          tokens=tokens, trainable_params=trainable, sequence_parallel_size=split)


def run_estimator(plan):
    """`tokens -> MemoryEstimate` for the run `plan` describes, from its config alone (no weights are read); None,
    with the reason logged, for a model whose module tree cannot be built on the meta device (some remote code): the
    estimate is advice, and its absence must not stop a run that would train."""
    try:
        shape = ModelShape.of(plan.config, plan.vocab_size, plan.trust_remote_code)
    except Exception as error:  # a model class's own constructor, a setting not foreseen: no estimate, the run goes on
        logger.info("memory estimate: not available for %s (%s: %s)", type(plan.config).__name__,
                    type(error).__name__, error)
        return None
    return functools.partial(estimate_training_memory, plan, shape=shape)


def longest_batch_tokens(dataset, batch_size: int, max_len: int) -> int:
    """Tokens in the longest batch a run can see: its longest sample (or packed row) times the batch size, an upper
    bound for padding-free rows and the batch itself for padded ones; max_len times the batch size when the lengths
    are not known up front (--lazy_preprocess)."""
    if hasattr(dataset, "rows"):  # chatft.data.datasets.PackedDataset
        longest = max(len(row["input_ids"]) for row in dataset.rows)
    elif hasattr(dataset, "samples"):  # chatft.data.datasets.SupervisedDataset
        longest = max(len(sample.input_ids) for sample in dataset.samples)
    else:
        longest = max_len
    return longest * batch_size

"""Tokenizer and model loading: ChatML tokens, precision, attention, LoRA (a .gguf file: chatft.model.gguf_convert).

Order matters: the tokenizer is loaded first (adding `<|im_start|>`/`<|im_end|>` if missing),
the run is planned from it (chatft.plan), then the model is loaded as the plan says, its
embeddings resized to the tokenizer, then wrapped for LoRA. Nothing here decides what the
plan decides (dtype, quantization, attention, sharding, trainable embeddings).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from pathlib import Path

import torch
import transformers

from chatft import console
from chatft.model.attention import PER_SAMPLE_SDPA, supports_per_sample_sdpa
from chatft.model.gguf_convert import converted_gguf_dir, gguf_config, gguf_to_hf_dir
from chatft.model.sources import saved_quantization
from chatft.model.lora_variants import (STARTING_ADAPTER_ATTRIBUTE, peft_init_lora_weights, rewrites_base_weights,
                                       starting_adapter)
from chatft.data.chat_format import (DEFAULT_SYSTEM_MESSAGE, IM_END, IM_START, chatml_template, is_thinking_template,
                                qwen3_template, resolve_chat_format)

logger = logging.getLogger(__name__)


def resolve_model_path(model_name_or_path: str) -> str:
    """A .gguf file becomes its converted HF directory; anything else is passed through."""
    if model_name_or_path.endswith(".gguf"):
        return str(gguf_to_hf_dir(model_name_or_path))
    return model_name_or_path


def join_process_group(training_args) -> None:
    """Join torch.distributed before any model loads: ZeRO-3 partitions weights while loading, and
    DeepSpeed's communicator must know the world size by then (accelerate leaves it unset on the CPU)."""
    training_args.device  # accelerate's lazy setup: init_process_group (nccl on CUDA, gloo on the CPU)
    if training_args.deepspeed and torch.distributed.is_initialized():
        import deepspeed

        if not torch.cuda.is_available() and torch.distributed.get_rank() == 0:
            logger.info("Starting DeepSpeed's CPU communication (its first run on a machine builds the op, about "
                        "90 s on 2 cores)")
        with console.library_output_hidden():  # the op's compiler lines and DeepSpeed's print() of the result
            deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def load_tokenizer(model_path: str, model_max_length: int, system_message: str, cache_dir=None, trust_remote_code=False,
                   chat_format: str = "chatml"):
    """Load the fast tokenizer, add ChatML tokens if missing, install the chat template of `chat_format` (auto: qwen3
    when the model's own template renders reasoning as Qwen3's does, else chatml).

    Returns (tokenizer, added_tokens, chat_format): the tokens that had to be added, and the format resolved.
    """
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_path,
        cache_dir=cache_dir,
        model_max_length=model_max_length,
        padding_side="right",
        trust_remote_code=trust_remote_code,
    )
    added = [token for token in (IM_START, IM_END) if token not in tokenizer.get_vocab()]
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added})
        logger.warning(
            "The tokenizer of %s lacks %s; added them. Their embeddings start untrained, so the embedding and "
            "output layers are trained too (see --train_embeddings).", model_path, " and ".join(added)
        )
    if tokenizer.pad_token is None:
        # Padding positions carry attention_mask 0 and label IGNORE_INDEX, so which token pads does not matter.
        tokenizer.pad_token = tokenizer.eos_token or IM_END
    own_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    chat_format = resolve_chat_format(chat_format, own_template)
    if chat_format == "qwen3":
        # the model's own thinking template when it has one (it renders as training does), else Qwen3's
        tokenizer.chat_template = own_template if is_thinking_template(own_template) else qwen3_template()
        if system_message != DEFAULT_SYSTEM_MESSAGE:
            logger.warning("--system_message is not used by the qwen3 format: Qwen3's template adds no system prompt; "
                           "put a system turn in the data instead.")
        logger.info("Chat format: qwen3 (Qwen3's template: reasoning in think blocks, no default system prompt)")
    else:
        tokenizer.chat_template = chatml_template(system_message)
    return tokenizer, added, chat_format


def model_config(model_path: str, trust_remote_code: bool = False, cache_dir: str | None = None):
    """The model's config, from a model directory, a cached hub id or a .gguf file (its conversion's config when the
    file was converted before, else its metadata)."""
    if model_path.endswith(".gguf"):
        path = Path(model_path).expanduser().resolve()
        converted = converted_gguf_dir(path)
        if (converted / "config.json").is_file():
            return transformers.AutoConfig.from_pretrained(converted)
        return gguf_config(path)
    return transformers.AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, cache_dir=cache_dir)


QLORA_PACKAGES = {"gptq": ("gptqmodel", "optimum"), None: ("bitsandbytes",)}


def training_setup_problems(model_args, training_args, lora_args) -> list[str]:
    """What the model's own config says against the flags, found from the config alone (before any data is
    tokenized or weights load): a quantized model trained without --q_lora, --q_lora's packages, LoRA target
    modules the model lacks."""
    path = model_args.model_name_or_path
    config = model_config(path, model_args.trust_remote_code, training_args.cache_dir)
    saved = saved_quantization(path, training_args.cache_dir)
    method = saved.get("quant_method", "unknown") if saved else None
    problems = []
    if method and not lora_args.q_lora:
        problems.append(f"--model_name_or_path {path}: a {method}-quantized model cannot be trained itself; train "
                        "LoRA adapters on it with --use_lora --q_lora, or start from its full-precision model.")
    if lora_args.q_lora and method not in QLORA_PACKAGES:
        problems.append(f"--q_lora: {path} is quantized with {method}; use a GPTQ or a full-precision model.")
    elif lora_args.q_lora:
        missing = [name for name in QLORA_PACKAGES[method] if importlib.util.find_spec(name) is None]
        if missing:
            problems.append(f"--q_lora on {'a GPTQ' if method else 'a full-precision'} model needs "
                            f"{' and '.join(missing)}: pip install {' '.join(missing)}")
    if lora_args.q_lora and method == "gptq" and getattr(lora_args, "use_dora", False):
        problems.append(f"--use_dora: peft has no DoRA for GPTQ layers ({path} is a GPTQ model); drop --use_dora, or "
                        "train on the full-precision model with --q_lora (NF4).")
    if lora_args.q_lora and method == "gptq" and is_moe_config(config, model_args.trust_remote_code):
        problems.append(f"--q_lora: {path} is a GPTQ mixture-of-experts model ({config.model_type}): transformers "
                        f"{transformers.__version__} would leave its experts randomly initialized (its GPTQ layers are "
                        "per expert, the model's experts fused); train --q_lora on the full-precision model (NF4).")
    explicit = explicit_target_parameters(lora_args)
    if lora_args.use_lora and not lora_args.lora_weight_path and (lora_args.lora_target_modules or explicit):
        problems += lora_target_problems(config, lora_args.lora_target_modules or [],
                                         model_args.trust_remote_code, explicit)
    return problems


def meta_model(config, trust_remote_code: bool = False):
    """The model of `config` on the meta device: its module tree, no memory, no weights. Constructed from its class
    (chatft.memory.causal_lm_class), not with from_config, which under a ZeRO-3 config builds inside DeepSpeed's
    zero.Init and fails initializing weights that have no data."""
    from chatft.memory import causal_lm_class

    with torch.device("meta"):
        return causal_lm_class(config, trust_remote_code)(config)


def is_moe_config(config, trust_remote_code: bool = False) -> bool:
    """Whether the model of `config` has routed experts (expert_parameter_names), from its module tree on the meta
    device."""
    return bool(expert_parameter_names(meta_model(config, trust_remote_code)))


def explicit_target_parameters(lora_args) -> list[str] | None:
    """--lora_target_parameters as given: None when not given (the model's routed experts), [] for `none`."""
    targets = getattr(lora_args, "lora_target_parameters", None)
    if targets is None:
        return None
    return [] if [t.lower() for t in targets] == ["none"] else list(targets)


def lora_target_problems(config, targets: list[str], trust_remote_code: bool = False,
                         target_parameters: list[str] | None = None) -> list[str]:
    """--lora_target_modules names that match no module of the model or only its experts/routers (no linear layers),
    and --lora_target_parameters names that match no parameter (peft matches a name or a dotted suffix)."""
    model = meta_model(config, trust_remote_code)  # the module tree alone: no memory, no weights
    moe = expert_parameter_names(model) + router_parameter_names(model)
    moe_hint = f" (its expert and router parameters, for --lora_target_parameters: {', '.join(moe)})" if moe else ""
    moe_modules = {name.rsplit(".", 1)[0] for name, _ in model.named_parameters() if name.endswith(tuple(moe))}
    module_names = [name for name, _ in model.named_modules()]
    parameter_names = [name for name, _ in model.named_parameters()]
    matching = lambda t, names: [name for name in names if name == t or name.endswith("." + t)]  # noqa: E731
    problems = []
    unknown = [t for t in targets if not matching(t, module_names)]
    if unknown:
        problems.append(f"--lora_target_modules: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a "
                        f"module of this {type(model).__name__}; its linear layers are "
                        f"{', '.join(linear_projection_names(model))}{moe_hint}")
    # experts and routers are no linear layers: peft adapts them through their parameters only
    bare = [t for t in targets if matching(t, module_names) and set(matching(t, module_names)) <= moe_modules]
    if bare:
        problems.append(f"--lora_target_modules: {', '.join(bare)} {'is' if len(bare) == 1 else 'are'} not a linear "
                        f"layer; adapt experts and routers with --lora_target_parameters {' '.join(moe)}")
    # peft refuses a target that names any module it has no LoRA layer for (a block such as `mlp`, or '': the model)
    modules = dict(model.named_modules())
    blocks = {t: sorted({type(modules[name]).__name__ for name in matching(t, module_names)
                         if not isinstance(modules[name], LORA_ADAPTABLE)})
              for t in targets if t not in unknown and t not in bare}
    for target, kinds in blocks.items():
        if kinds:
            problems.append(f"--lora_target_modules: {target or repr(target)} names {', '.join(kinds)}, not a layer "
                            f"LoRA adapts (a linear layer or an embedding); this model's linear layers are "
                            f"{', '.join(linear_projection_names(model))}")
    unknown = [t for t in target_parameters or [] if not matching(t, parameter_names)]
    if unknown:
        problems.append(f"--lora_target_parameters: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a "
                        f"parameter of this {type(model).__name__}; its expert and router parameters are "
                        f"{', '.join(moe) or 'none (it is not a mixture-of-experts model)'}")
    return problems


def quantized_loading(plan, device) -> dict:
    """from_pretrained arguments for Q-LoRA's base, on `device`: the model's own GPTQ weights, or NF4 quantization on
    load. (What --q_lora needs was checked with the flags: training_setup_problems.)"""
    # One whole copy per process, on its own device: Q-LoRA shards nothing (ZeRO-3 and FSDP are refused).
    loading = {"device_map": {"": device}}
    if plan.quantization == "gptq":
        return loading | gptq_loading(plan.gptq_bits)
    return loading | {"quantization_config": nf4_config(plan.compute_dtype)}


def nf4_config(dtype: torch.dtype):
    """Q-LoRA's quantization: 4-bit NormalFloat with double-quantized scales, computing in `dtype`."""
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
    )


def gptq_loading(bits: int) -> dict:
    """Load a GPTQ model (quantized to `bits`) with gptqmodel kernels that have a backward pass."""
    console.import_gptqmodel()
    # "auto" may pick an inference-only kernel (on the CPU it does); "auto_trainable" picks one that trains
    return {"quantization_config": transformers.GPTQConfig(bits=bits, backend="auto_trainable")}


def load_model(plan, lora_args, device=None):
    """Load the causal LM the plan (a chatft.plan.RunPlan) describes, for full-parameter, LoRA or Q-LoRA training,
    with embeddings sized to the tokenizer's vocabulary; `lora_args` give LoRA's settings, `device` the place of
    Q-LoRA's 4-bit copy (training_args.device)."""
    quantization = quantized_loading(plan, device) if plan.mode == "qlora" else {}
    logger.info("Loading %s (dtype=%s, attn_implementation=%s%s)", plan.model_path, plan.load_dtype,
                plan.attn_implementation, ", 4-bit" if quantization else "")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        plan.model_path,
        cache_dir=plan.cache_dir,
        dtype=plan.load_dtype,
        attn_implementation=plan.attn_implementation,
        trust_remote_code=plan.trust_remote_code,
        use_safetensors=True,  # weights never come from a pickle
        **quantization,
    )
    if plan.shard == "zero3":
        register_zero3_leaf_modules(model)
    if plan.per_sample_attention and supports_per_sample_sdpa(model):
        # rows of several samples (padding-free batches, packed rows): sdpa on each sample alone, no mask built
        model.set_attn_implementation(PER_SAMPLE_SDPA)
        logger.info("Attention: sdpa on each sample of a row alone (%s)", PER_SAMPLE_SDPA)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    # num_embeddings, not weight.shape: under ZeRO-3 the weight is a partitioned, empty placeholder
    if plan.vocab_size > model.get_input_embeddings().num_embeddings or plan.added_tokens:
        model.resize_token_embeddings(plan.vocab_size)
    if plan.mode == "qlora":
        import peft

        # fp32 norms and output, input grads for checkpointing: what training on a frozen 4-bit base needs
        with unquantized_experts_kept_as_loaded(model) if plan.quantization == "nf4" else contextlib.nullcontext():
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=plan.activation_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    if plan.mode != "full":
        model = wrap_lora(model, lora_args, plan)
    elif not plan.train_embeddings:  # full-parameter training trains everything unless told not to
        model.get_input_embeddings().weight.requires_grad_(False)
        if model.get_output_embeddings() is not None:
            model.get_output_embeddings().weight.requires_grad_(False)
    return model


@contextlib.contextmanager
def unquantized_experts_kept_as_loaded(model):
    """Within it, a MoE model's routed experts (fused 3-D parameters, which bitsandbytes leaves unquantized: it
    quantizes nn.Linear only) keep the dtype they were loaded in: peft's prepare_model_for_kbit_training upcasts
    every 16-bit parameter that is not 4-bit to fp32, which for the experts (most of a MoE model's weights) would
    double the model's memory. Their storage is set aside (an empty tensor in its place) while it runs, so no fp32
    copy is ever made. They are not quantized with bitsandbytes' replace_parameter_4bit either: with it, peft's
    stacked expert adapters (down_proj's wrapping gate_up_proj's) read the inner weight from the parametrization cache
    without its adapter (that adapter got no gradient), and activation checkpointing's recomputation failed
    (bitsandbytes 0.50.2, peft 0.21.2)."""
    experts = [(name, parameter) for name, parameter in model.named_parameters()
               if name.split(".")[-2:-1] == ["experts"] and parameter.dim() == 3
               and parameter.dtype in (torch.float16, torch.bfloat16)]
    if experts:
        logger.info("Q-LoRA: the routed experts (%s) stay in %s, not 4-bit: bitsandbytes quantizes linear layers "
                    "only, and its quantization of bare parameters does not yet work with peft's expert adapters",
                    ", ".join(expert_parameter_names(model)), str(experts[0][1].dtype).removeprefix("torch."))
    held = [parameter.data for _, parameter in experts]
    for _, parameter in experts:
        parameter.data = torch.empty(0, dtype=parameter.dtype, device=parameter.device)
    try:
        yield
    finally:
        for (_, parameter), data in zip(experts, held):
            parameter.data = data


def embedding_module_names(model) -> list[str]:
    """Qualified names of the input embedding and output layer (e.g. model.embed_tokens, lm_head)."""
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return [name for name, module in model.named_modules() if id(module) in wanted]


# the layer types peft's LoRA wraps (transformers' Conv1D: GPT-2-style attention)
LORA_ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                  transformers.pytorch_utils.Conv1D)


def is_linear(module) -> bool:
    """nn.Linear (bitsandbytes' Linear4bit is one) or a gptqmodel quantized linear kernel."""
    if isinstance(module, torch.nn.Linear):
        return True
    gptq_kernels = sys.modules.get("gptqmodel.nn_modules.qlinear")  # imported only if a GPTQ model was loaded
    return gptq_kernels is not None and isinstance(module, gptq_kernels.BaseQuantLinear)


def linear_projection_names(model) -> list[str]:
    """Short names of every linear layer except the output layer, e.g. [down_proj, gate_proj, k_proj, ...].

    Found from the model rather than listed per architecture (Qwen-1's c_attn/c_proj/w1/w2 match nothing today).
    """
    output_layer = model.get_output_embeddings()
    return sorted({
        name.split(".")[-1]
        for name, module in model.named_modules()
        if is_linear(module) and module is not output_layer
    })


def expert_parameter_names(model) -> list[str]:
    """Dotted suffixes (e.g. mlp.experts.gate_up_proj) of the routed experts' fused weights: every 3-D parameter
    held by a module named `experts` (transformers 5 stores each MoE layer's experts as one [experts, out, in]
    tensor per projection). Found from the model, not listed per architecture; [] for a dense model."""
    return sorted({".".join(name.split(".")[-3:]) for name, parameter in model.named_parameters()
                   if len(full_shape(parameter)) == 3 and name.split(".")[-2:-1] == ["experts"]})


def full_shape(parameter) -> tuple[int, ...]:
    """A parameter's shape; under ZeRO-3 (loaded inside zero.Init) the tensor is an empty partition and the shape
    is DeepSpeed's `ds_shape` (peft's ParamWrapper reads it the same way)."""
    return tuple(getattr(parameter, "ds_shape", parameter.shape))


def moe_block_classes(model) -> list[type]:
    """The classes of the modules that hold a MoE layer's routed experts (a child named `experts`, as
    expert_parameter_names finds them): Qwen3MoeSparseMoeBlock, Qwen2MoeSparseMoeBlock, ...; [] for a dense model."""
    return sorted({type(module) for module in model.modules() if "experts" in dict(module.named_children())},
                  key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


def register_zero3_leaf_modules(model) -> None:
    """Make each MoE block one ZeRO-3 leaf: its parameters (router, experts, their adapters) are gathered together
    when the block runs. ZeRO-3 otherwise gathers per submodule, in an order it records from the first step, and the
    ranks of a step route their tokens differently, so they would run different submodules and their collectives
    could mismatch (a hang). What LLaMA-Factory does per architecture, found here from the model."""
    classes = moe_block_classes(model)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
        logger.info("ZeRO-3: %s gathered as whole modules (leaf modules)", ", ".join(c.__name__ for c in classes))


def router_parameter_names(model) -> list[str]:
    """Dotted suffixes (e.g. mlp.gate.weight) of the routers' weights: the 2-D parameters of a module beside an
    `experts` module that is not a linear layer (qwen2_moe's shared_expert_gate is one: LoRA's defaults adapt it)."""
    names = set()
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        if "experts" not in children:
            continue
        for child_name, child in children.items():
            if child_name != "experts" and not is_linear(child):
                names |= {f"{parent_name.split('.')[-1]}.{child_name}.{name}"
                          for name, parameter in child.named_parameters(recurse=False) if len(full_shape(parameter)) == 2}
    return sorted(names)


def linear_lora_dropout(model, p: float) -> None:
    """Give the linear layers' adapters their dropout `p`, as peft's update_layer would have: the LoraConfig was
    built with none because its bare-parameter adapters (experts, router) refuse any."""
    import peft

    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and not isinstance(module, peft.tuners.lora.ParamWrapper):
            for adapter in module.lora_dropout:
                module.lora_dropout[adapter] = torch.nn.Dropout(p=p)


REFERENCE_ADAPTER = "reference"  # DPO/KTO's frozen copy of --lora_weight_path, beside the trained "default"


def frozen_reference(model, plan, lora_args, training_args):
    """A full-parameter DPO/KTO run's reference (the plan's reference "copy"): the model as it starts, in eval mode,
    without gradients (so no optimizer state). Under ZeRO-3 a second model partitioned across the processes like
    the policy (sharded_reference); otherwise a copy of it (frozen_copy)."""
    if plan.shard == "zero3":
        return sharded_reference(model, plan, lora_args, training_args.hf_deepspeed_config.config)
    return frozen_copy(model)


def frozen_copy(model):
    """A copy of `model` in eval mode, without gradients; chatft.train.preference moves it to the policy's device
    and dtype at first use."""
    import copy

    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def sharded_reference(model, plan, lora_args, deepspeed_config: dict):
    """Under ZeRO-3: the reference loaded as the policy `model` was (load_model, inside DeepSpeed's zero.Init as
    transformers loads once the run's ZeRO-3 config exists: each process holds 1/N of its weights), frozen, in an
    inference-only DeepSpeed engine (inference_deepspeed_config), whose hooks gather each module's weights for its
    forward as the policy's engine does. What TRL's prepare_deepspeed does for its ref_model."""
    import deepspeed

    logger.info("The reference: a second copy of the model, partitioned by ZeRO-3 like the one trained")
    reference = load_model(plan, lora_args)
    reference.eval()
    reference.requires_grad_(False)
    # the rows resize_token_embeddings adds (ChatML tokens, a larger tokenizer) are drawn at random, differently
    # for each load: the reference takes the policy's, so that it starts as the policy does
    pairs = {id(ours.weight): (ours.weight, theirs.weight)  # once each: tied layers share their weight
             for ours, theirs in ((model.get_input_embeddings(), reference.get_input_embeddings()),
                                  (model.get_output_embeddings(), reference.get_output_embeddings()))
             if ours is not None}
    for policy_weight, reference_weight in pairs.values():
        with deepspeed.zero.GatheredParameters([policy_weight, reference_weight], modifier_rank=0):
            reference_weight.data.copy_(policy_weight.data)
    hidden_size = model.config.get_text_config().hidden_size
    with console.library_output_hidden():  # DeepSpeed prints its whole config
        engine, *_ = deepspeed.initialize(model=reference, config=inference_deepspeed_config(deepspeed_config,
                                                                                             hidden_size))
    engine.eval()
    return engine


# zero_optimization sizes a config may leave "auto", and the model's hidden size h they come to: transformers fills
# them only when training starts (HfTrainerDeepSpeedConfig.trainer_config_finalize), with these values
HIDDEN_SIZE_BASED = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                     "stage3_param_persistence_threshold": lambda h: 10 * h}


def inference_deepspeed_config(config: dict, hidden_size: int) -> dict:
    """A copy of a run's DeepSpeed config (TrainingArguments' hf_deepspeed_config.config: its "auto" values already
    filled from the flags) for a model that only runs forward: no optimizer, scheduler or optimizer offload (DeepSpeed
    would build them, for nothing), the ZeRO stage and its other settings (parameter offload, precision, batch sizes)
    kept, the sizes still "auto" filled from `hidden_size` as transformers fills the policy's."""
    import copy

    config = copy.deepcopy(config)
    for name in ("optimizer", "scheduler"):
        config.pop(name, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    for name, size in HIDDEN_SIZE_BASED.items():
        if zero.get(name) == "auto":
            zero[name] = size(hidden_size)
    return config


def wrap_lora(model, lora_args, plan):
    """Add LoRA adapters (new, or continued from --lora_weight_path); only adapters (and, as the plan says, the
    embeddings) train."""
    import peft

    if lora_args.lora_weight_path:
        logger.info("Continuing from the adapter in %s (its LoRA settings apply)", lora_args.lora_weight_path)
        model = peft.PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
        if plan.reference == "adapter":  # DPO/KTO from this adapter: it is the reference too, frozen (TRL's way)
            model.load_adapter(lora_args.lora_weight_path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        if model.peft_config["default"].target_parameters and lora_args.lora_dropout:
            # its config says dropout 0 only because peft's expert adapters allow none (below): the linear layers' is
            # --lora_dropout, as when it was made
            linear_lora_dropout(model, lora_args.lora_dropout)
    else:
        modules_to_save = ([name.split(".")[-1] for name in embedding_module_names(model)] if plan.train_embeddings
                           else None)
        target_parameters = (expert_parameter_names(model) if plan.lora_target_parameters is None
                             else list(plan.lora_target_parameters))
        config = peft.LoraConfig(
            r=lora_args.lora_r,
            lora_alpha=lora_args.lora_alpha,
            # peft's ParamWrapper (the adapter of a bare parameter: fused experts, the router) refuses any dropout,
            # since dropout(x) cannot be factored out of its per-expert product; the linear layers get theirs below
            lora_dropout=0.0 if target_parameters else lora_args.lora_dropout,
            target_modules=lora_args.lora_target_modules or linear_projection_names(model),
            target_parameters=target_parameters or None,
            bias=lora_args.lora_bias,
            task_type="CAUSAL_LM",
            modules_to_save=modules_to_save,
            ensure_weight_tying=bool(modules_to_save) and bool(getattr(model.config, "tie_word_embeddings", False)),
            use_dora=lora_args.use_dora,
            use_rslora=lora_args.use_rslora,
            init_lora_weights=peft_init_lora_weights(lora_args.lora_init),
        )
        model = peft.get_peft_model(model, config)
        if not target_parameters and expert_parameter_names(model):
            logger.info("LoRA leaves the routed experts frozen (--lora_target_parameters none, or DoRA/PiSSA/OLoRA, "
                        "which peft cannot apply to them)")
        if target_parameters and lora_args.lora_dropout:
            linear_lora_dropout(model, lora_args.lora_dropout)
        logger.info("LoRA on %s", ", ".join(sorted(model.peft_config["default"].target_modules) + target_parameters))
        if rewrites_base_weights(config.init_lora_weights):
            # the start the base weights were rewritten with: saving converts the adapter to a plain LoRA with it
            setattr(model, STARTING_ADAPTER_ATTRIBUTE, starting_adapter(model))
    # Trainable weights in fp32 whatever the base dtype: bf16/fp16 optimizer updates lose small steps.
    # (DeepSpeed keeps its own fp32 master copy, and ZeRO-3's parameters are placeholders: leave them.)
    if plan.shard != "zero3":
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    if plan.activation_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    model.print_trainable_parameters()
    return model

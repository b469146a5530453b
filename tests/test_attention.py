"""chatft.model.attention: in a row of several samples, each sample gets exactly what it gets alone, with no mask built."""

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers

from chatft.model.attention import PER_SAMPLE_SDPA, sample_spans, supports_per_sample_sdpa
from support import assert_close_up_to_rounding, decoder_terms, run

LENGTHS = (9, 4, 13)  # three samples of one row


def test_sample_spans_split_where_positions_restart():
    row = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert sample_spans(row, 1) == [[(0, 3), (3, 5), (5, 9)]]
    assert sample_spans(row, 2) == [[(0, 3), (3, 5), (5, 9)]] * 2  # one row of positions, broadcast over the batch
    two_rows = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])
    assert sample_spans(two_rows, 2) == [[(0, 4)], [(0, 2), (2, 4)]]
    assert sample_spans(torch.arange(6)[None], 1) is None  # one sample: plain sdpa
    assert sample_spans(torch.tensor([[5, 6, 7, 2, 3]]), 1) == [[(0, 3), (3, 5)]]  # any restart, not only at 0
    assert sample_spans(None, 1) is None


def load(model_dir, attn_implementation, setup):
    base = "sdpa" if attn_implementation == PER_SAMPLE_SDPA else attn_implementation
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=base)
    if attn_implementation == PER_SAMPLE_SDPA:
        assert supports_per_sample_sdpa(model)
        model.set_attn_implementation(PER_SAMPLE_SDPA)
    if setup == "checkpointing":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if setup == "lora":
        torch.manual_seed(1)  # the same random (non-zero) LoRA weights in every model, so every LoRA weight has a gradient
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model.train()  # training mode: checkpointing recomputes only then


def sdpa_calls(profiler) -> list[tuple[int, list[int]]]:
    """(query length, attn_mask's shape: [] when none was given) of every torch scaled_dot_product_attention call
    a torch.profiler.profile(record_shapes=True) recorded, the recomputations of a checkpointed backward included."""
    return [(event.input_shapes[0][2], event.input_shapes[3]) for event in profiler.events()
            if event.name == "aten::scaled_dot_product_attention"]


def outputs_and_grads(model, input_ids, position_ids, targets):
    """Per-token logits and the gradients of the summed cross-entropy against `targets`."""
    model.zero_grad()
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="sum").backward()
    return logits.detach()[0], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("setup", ["full", "lora", "checkpointing"])
@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_each_sample_of_a_row_gets_what_it_gets_alone(tiny_qwen2_arch_dir, reference, setup):
    generator = torch.Generator().manual_seed(0)
    vocab = transformers.AutoConfig.from_pretrained(tiny_qwen2_arch_dir).vocab_size
    samples = [torch.randint(0, vocab, (1, n), generator=generator) for n in LENGTHS]
    targets = [torch.randint(0, vocab, (1, n), generator=generator) for n in LENGTHS]

    alone = load(tiny_qwen2_arch_dir, reference, setup)
    alone_logits, alone_grads = [], {}
    for ids, target in zip(samples, targets):
        logits, grads = outputs_and_grads(alone, ids, torch.arange(ids.shape[1])[None], target)
        alone_logits.append(logits)
        alone_grads = {n: alone_grads.get(n, 0) + g for n, g in grads.items()}

    row = load(tiny_qwen2_arch_dir, PER_SAMPLE_SDPA, setup)
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profiler:
        row_logits, row_grads = outputs_and_grads(row, torch.cat(samples, 1), position_ids, torch.cat(targets, 1))

    calls = sdpa_calls(profiler)
    layers = row.config.num_hidden_layers
    forward_calls = layers * (2 if setup == "checkpointing" else 1)  # checkpointing runs every layer again
    assert sorted(length for length, _ in calls) == sorted(list(LENGTHS) * forward_calls)  # per sample, not per row
    assert all(mask == [] for _, mask in calls), "a mask was built for a row of samples"
    terms = decoder_terms(row.config, loss=True)
    start = 0
    for n, logits in zip(LENGTHS, alone_logits):
        assert_close_up_to_rounding(row_logits[start : start + n], logits, terms=terms)
        start += n
    assert row_grads.keys() == alone_grads.keys() and row_grads
    if setup == "lora":
        assert all("lora_" in name for name in row_grads)
    for name, grad in alone_grads.items():
        assert_close_up_to_rounding(row_grads[name], grad, terms=terms)


def test_a_padded_batch_keeps_its_mask(tiny_qwen2_arch_dir):
    """Rows that are one sample each (padding masked) take transformers' sdpa path unchanged."""
    reference = load(tiny_qwen2_arch_dir, "sdpa", "full").eval()
    model = load(tiny_qwen2_arch_dir, PER_SAMPLE_SDPA, "full").eval()
    ids = torch.randint(0, reference.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        actual = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1, :6], expected[1, :6])


def test_models_whose_attention_is_not_plain_keep_transformers_masks(tmp_path):
    qwen2 = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    assert supports_per_sample_sdpa(transformers.AutoModelForCausalLM.from_config(qwen2))
    windowed = transformers.Qwen2Config(**{**qwen2.to_dict(), "use_sliding_window": True, "sliding_window": 8,
                                           "max_window_layers": 0, "layer_types": None})
    assert not supports_per_sample_sdpa(transformers.AutoModelForCausalLM.from_config(windowed))


def test_training_uses_per_sample_attention_by_default_and_saves_a_portable_config(tiny_qwen2_arch_dir, data_file, tmp_path):
    trainer = run(tiny_qwen2_arch_dir, data_file, tmp_path / "out")
    assert trainer.model.config._attn_implementation == PER_SAMPLE_SDPA
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert PER_SAMPLE_SDPA not in json.dumps(saved)  # plain transformers loads what was trained
    explicit = run(tiny_qwen2_arch_dir, data_file, tmp_path / "sdpa", "--attn_implementation", "sdpa")
    assert explicit.model.config._attn_implementation == "sdpa"


# A model whose code ships with it (auto_map in config.json, loaded with --trust_remote_code), as Qwen-1's
# QWenLMHeadModel does. Its class says what such code says of itself to transformers: its attention does not go
# through transformers' attention functions (_supports_attention_backend False). The layers are Qwen2's, to stay tiny.
OWN_ATTENTION_CODE = '''
from transformers import Qwen2Config, Qwen2ForCausalLM


class OwnAttentionConfig(Qwen2Config):
    model_type = "own_attention_qwen2"


class OwnAttentionForCausalLM(Qwen2ForCausalLM):
    config_class = OwnAttentionConfig
    _supports_attention_backend = False
'''


def remote_code_model(model_dir, root):
    """A copy of `model_dir` whose config.json names OWN_ATTENTION_CODE's classes (in modeling_own_attention.py)."""
    path = Path(shutil.copytree(model_dir, root / "own_attention_qwen2"))
    (path / "modeling_own_attention.py").write_text(OWN_ATTENTION_CODE)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="own_attention_qwen2", architectures=["OwnAttentionForCausalLM"], auto_map={
        "AutoConfig": "modeling_own_attention.OwnAttentionConfig",
        "AutoModelForCausalLM": "modeling_own_attention.OwnAttentionForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_model_with_its_own_attention_code_gets_padded_batches(tiny_qwen2_arch_dir, data_file, tmp_path, capsys):
    """Remote-code models (e.g. Qwen-1's QWenLMHeadModel) attend across a row's samples: no padding-free rows there."""
    import finetune
    from chatft.data.datasets import ChatCollator

    model_dir = remote_code_model(tiny_qwen2_arch_dir, tmp_path)
    trainer = run(model_dir, data_file, tmp_path / "out", "--trust_remote_code", "True")
    assert type(trainer.model).__name__ == "OwnAttentionForCausalLM"  # the model's own code, loaded from its directory
    assert isinstance(trainer.data_collator, ChatCollator)
    assert trainer.model.config._attn_implementation == "sdpa"
    code = finetune.main(["--model_name_or_path", str(model_dir), "--data_path", data_file, "--output_dir",
                          str(tmp_path / "packed"), "--packing", "True", "--use_cpu", "True", "--max_steps", "1",
                          "--trust_remote_code", "True"])
    assert code == 2
    assert ("--packing: OwnAttentionForCausalLM has its own attention code, which would let packed samples attend to "
            "each other" in capsys.readouterr().err)
    assert not (tmp_path / "packed").exists()


def test_a_branch_attends_to_its_samples_prefix_and_itself_only(tiny_qwen2_arch_dir):
    """A preference row: prompt once, then each reply continuing its positions. Each reply's outputs and gradients
    equal those of prompt + that reply alone, in two pairs of one row; and a row whose first sample starts mid-way
    (positions 5, 6, 7, then 2, 3) is still two samples, not a branch."""
    from chatft.model.attention import branch_context

    assert branch_context([0, 1, 2, 3, 2, 3], [(0, 4), (4, 6)]) == [None, 0]
    assert branch_context([5, 6, 7, 2, 3], [(0, 3), (3, 5)]) == [None, None]
    assert branch_context([0, 1, 2, 3, 0, 1, 1, 2], [(0, 4), (4, 6), (6, 8)]) == [None, None, 4]
    model = load(tiny_qwen2_arch_dir, PER_SAMPLE_SDPA, "full")
    torch.manual_seed(3)
    vocab = model.config.vocab_size
    terms = decoder_terms(model.config, loss=True)
    pairs = [(torch.randint(vocab, (7,)), torch.randint(vocab, (5,)), torch.randint(vocab, (8,))),
             (torch.randint(vocab, (4,)), torch.randint(vocab, (3,)), torch.randint(vocab, (2,)))]
    ids, positions = [], []
    for prompt, chosen, rejected in pairs:
        ids += [prompt, chosen, rejected]
        positions += [torch.arange(len(prompt) + len(chosen)), torch.arange(len(rejected)) + len(prompt)]
    row_ids, row_positions = torch.cat(ids)[None], torch.cat(positions)[None]
    targets = torch.randint(vocab, row_ids.shape)
    row_logits, row_grads = outputs_and_grads(model, row_ids, row_positions, targets)
    offset = 0
    for prompt, chosen, rejected in pairs:
        prompt_end, chosen_end = offset + len(prompt), offset + len(prompt) + len(chosen)
        for reply, where in ((chosen, slice(prompt_end, chosen_end)),
                             (rejected, slice(chosen_end, chosen_end + len(rejected)))):
            sequence = torch.cat([prompt, reply])[None]
            logits = model(input_ids=sequence, use_cache=False).logits.detach()[0]
            assert_close_up_to_rounding(row_logits[where], logits[len(prompt):], terms=terms)
            if reply is chosen:
                assert_close_up_to_rounding(row_logits[offset:prompt_end], logits[: len(prompt)], terms=terms)
        offset = chosen_end + len(rejected)
    # gradients: the row's summed loss = the sum over the alone sequences of their replies' (and one prompt's) losses
    model.zero_grad()
    total, offset = 0, 0
    for prompt, chosen, rejected in pairs:
        prompt_end, chosen_end = offset + len(prompt), offset + len(prompt) + len(chosen)
        for k, (reply, where) in enumerate(((chosen, slice(prompt_end, chosen_end)),
                                            (rejected, slice(chosen_end, chosen_end + len(rejected))))):
            logits = model(input_ids=torch.cat([prompt, reply])[None], use_cache=False).logits[0]
            wanted = torch.cat([targets[0, offset:prompt_end], targets[0, where]])
            per_token = torch.nn.functional.cross_entropy(logits, wanted, reduction="none")
            total = total + (per_token if k == 0 else per_token[len(prompt):]).sum()
        offset = chosen_end + len(rejected)
    total.backward()
    for name, parameter in model.named_parameters():
        assert_close_up_to_rounding(row_grads[name], parameter.grad, terms=terms)

"""ChatTrainer: the loss computed only at labelled positions, in chunks, equals the model's own loss and
gradients; the output layer never sees more than a chunk of rows; training steps are the same either way. And what
it relies on in transformers: a causal LM returns its output layer's result as its logits (the loss hooks). What the
atomic checkpoints rely on (chatft.patches.checkpoints_written_as) is pinned in test_patches.py."""

import pytest
import torch
import transformers

from chatft.data.chat_format import IGNORE_INDEX
from chatft.data.datasets import ChatCollator, SupervisedDataset
from chatft.train.losses import head_linears, labelled_cross_entropy, output_layer_computes, supports_labelled_logits
from support import CONVERSATIONS, assert_close_up_to_rounding, decoder_terms, make_non_chatml_model, run


def batch_of(tokenizer, samples):
    return ChatCollator(tokenizer.pad_token_id)([SupervisedDataset(samples, tokenizer, 64)[i] for i in range(len(samples))])


@pytest.mark.parametrize("chunk_size", [3, 10_000])
@pytest.mark.parametrize("tie", [False, True])
def test_same_loss_and_gradients_as_the_full_logits(tmp_path, qwen3_tokenizer, chunk_size, tie):
    model = transformers.AutoModelForCausalLM.from_pretrained(make_model(tmp_path, tie))
    batch = batch_of(qwen3_tokenizer, CONVERSATIONS[:4])
    reference = model(**batch).loss
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    outputs_seen = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, inputs, output: outputs_seen.append(output.shape))
    count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with output_layer_computes(head_linears(model), batch["labels"], chunk_size, labelled_cross_entropy) as returned:
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss_sum = returned.of(outputs, ())
    assert outputs_seen == [torch.Size([])]  # the output layer returned the loss: no vocabulary-wide tensor
    (loss_sum / count).backward()
    terms = decoder_terms(model.config, loss=True)  # the same sums, in chunks: equal up to their rounding
    assert_close_up_to_rounding(loss_sum / count, reference, terms=terms)
    for name, p in model.named_parameters():
        assert_close_up_to_rounding(p.grad, expected[name], terms=terms)
    assert model(**batch).logits.shape[-1] == model.config.vocab_size  # restored afterwards


def test_bf16_autocast_matches_the_plain_path(tiny_qwen_arch_dir, qwen3_tokenizer):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_arch_dir)
    batch = batch_of(qwen3_tokenizer, CONVERSATIONS[:4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(**batch)
    reference = outputs.loss
    reference.backward()
    expected = model.lm_head.weight.grad.clone()
    model.zero_grad()
    count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with (torch.autocast("cpu", dtype=torch.bfloat16),
          output_layer_computes([model.lm_head], batch["labels"], 7, labelled_cross_entropy) as returned):
        loss = returned.of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), ()) / count
    loss.backward()
    # both paths share everything up to the output layer's bf16 dot products: the loss carries their rounding
    assert_close_up_to_rounding(loss, reference, terms=model.config.hidden_size, dtype=torch.bfloat16,
                                magnitude=outputs.logits.abs().max())
    assert torch.nn.functional.cosine_similarity(model.lm_head.weight.grad.flatten(), expected.flatten(), 0) > 0.999


def test_no_labelled_position_gives_zero_loss_and_gradients(tiny_qwen_arch_dir, qwen3_tokenizer):
    """A batch whose replies were all truncated away still runs the same backward on every rank."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_arch_dir)
    batch = batch_of(qwen3_tokenizer, CONVERSATIONS[:2])
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    with output_layer_computes([model.lm_head], labels, 16, labelled_cross_entropy) as returned:
        loss = returned.of(model(input_ids=batch["input_ids"]), ())
    loss.backward()
    assert loss.item() == 0.0 and model.lm_head.weight.grad is not None
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("extra", [
    ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"],
    ["--per_device_train_batch_size", "4", "--packing", "True"],
    ["--use_lora", "--lora_r", "4", "--per_device_train_batch_size", "4"],
])
def test_training_steps_match_the_plain_loss(tiny_qwen_arch_dir, data_file, tmp_path, extra):
    common = ["--max_steps", "2", "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", *extra]
    plain = run(tiny_qwen_arch_dir, data_file, tmp_path / "plain", *common, "--labelled_logits_only", "False")
    labelled = run(tiny_qwen_arch_dir, data_file, tmp_path / "labelled", *common, "--labelled_logits_only", "True")
    assert labelled.labelled_logits and not plain.labelled_logits
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (plain, labelled)]
    terms = decoder_terms(plain.model.config, loss=True)
    assert_close_up_to_rounding(losses[1], losses[0], terms=terms)
    for name, value in plain.model.state_dict().items():
        assert_close_up_to_rounding(labelled.model.state_dict()[name], value, terms=terms)


def test_trainable_tied_embeddings_under_lora(tmp_path, data_file):
    """Added ChatML tokens: the output layer is peft's modules_to_save copy, tied to the embedding."""
    base_dir = make_non_chatml_model(tmp_path, tie=True)
    common = ["--use_lora", "--lora_r", "4", "--max_steps", "2", "--optim", "sgd", "--learning_rate", "0.5",
              "--per_device_train_batch_size", "4"]
    plain = run(base_dir, data_file, tmp_path / "plain", *common, "--labelled_logits_only", "False")
    labelled = run(base_dir, data_file, tmp_path / "labelled", *common, "--labelled_logits_only", "True")
    for name, value in plain.model.state_dict().items():
        assert_close_up_to_rounding(labelled.model.state_dict()[name], value,
                                    terms=decoder_terms(plain.model.config, loss=True))


@pytest.mark.parametrize("architecture", ["qwen", "llama"])
def test_causal_lms_return_their_output_layers_result_as_logits(tiny_qwen_arch_dir, tmp_path, qwen3_tokenizer, architecture):
    """What the labelled-positions loss relies on in transformers' models: the output layer is called once, on the
    final hidden states of every position, and what it returns is the model's logits, unchanged."""
    path = tiny_qwen_arch_dir if architecture == "qwen" else make_non_chatml_model(tmp_path, tie=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    input_ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    calls, returned = [], torch.tensor(1.5)
    model.get_output_embeddings().register_forward_hook(lambda m, args, output: calls.append(args[0].shape) or returned)
    outputs = model(input_ids=input_ids, output_hidden_states=True)
    assert calls == [outputs.hidden_states[-1].shape] == [(2, 5, model.config.hidden_size)]
    assert outputs.logits is returned


def test_an_output_layer_the_model_never_called_is_an_error(tiny_qwen_arch_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_arch_dir)
    input_ids = torch.tensor([[1, 2, 3, 4]])
    with output_layer_computes([torch.nn.Linear(4, 4)], input_ids, 16, labelled_cross_entropy) as returned:
        outputs = model(input_ids=input_ids)
    with pytest.raises(RuntimeError, match="the layer ran 0 times and logits has shape .*--labelled_logits_only False"):
        returned.of(outputs, ())


def make_model(tmp_path, tie):
    config = transformers.Qwen2Config(vocab_size=151_936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                      use_cache=False)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / f"tie-{tie}")
    return tmp_path / f"tie-{tie}"


def test_models_that_transform_logits_keep_the_plain_loss(tiny_qwen_arch_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_arch_dir)
    assert supports_labelled_logits(model)
    model.config.final_logit_softcapping = 30.0  # as Gemma-2 does after its output layer
    assert not supports_labelled_logits(model)


@pytest.mark.parametrize("weight_trains", [True, False])
def test_linear_cross_entropy_with_bias(weight_trains):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    head.weight.requires_grad_(weight_trains)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    reference = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).flatten(0, 1), labels[:, 1:].flatten(),
                                                  reduction="sum")
    grads = torch.autograd.grad(reference, [hidden, head.bias] + ([head.weight] if weight_trains else []))
    with output_layer_computes([head], labels, 4, labelled_cross_entropy):
        loss = head(hidden)
    terms = head.in_features + head.out_features + labels.numel()  # logits, log-sum-exp and softmax, positions
    assert_close_up_to_rounding(loss, reference, terms=terms)
    for got, want in zip(torch.autograd.grad(loss, [hidden, head.bias] + ([head.weight] if weight_trains else [])), grads):
        assert_close_up_to_rounding(got, want, terms=terms)


def test_rounding_tolerance_passes_reordered_sums_and_fails_a_real_difference():
    """conftest's rule on 262k dot products of 1024 terms: fp32 sums taken one term at a time (the least favourable
    order) against the exactly rounded result pass; a 1% error in one typical element fails; bf16 inputs pass only
    as bf16."""
    torch.manual_seed(0)
    x, w = torch.randn(512, 1024), torch.randn(1024, 512)
    exact = (x.double() @ w.double()).float()
    one_by_one = torch.zeros(512, 512)
    for k in range(1024):
        one_by_one += torch.outer(x[:, k], w[k])
    assert not torch.equal(one_by_one, exact)
    assert_close_up_to_rounding(one_by_one, exact, terms=1024)
    wrong = one_by_one.clone()
    wrong.view(-1)[exact.abs().flatten().argsort()[exact.numel() // 2]] *= 1.01  # an element of median magnitude
    with pytest.raises(AssertionError, match="Mismatched elements: 1 / 262144"):
        assert_close_up_to_rounding(wrong, exact, terms=1024)
    in_bf16 = (x.bfloat16() @ w.bfloat16()).float()
    with pytest.raises(AssertionError):
        assert_close_up_to_rounding(in_bf16, exact, terms=1024)
    assert_close_up_to_rounding(in_bf16, exact, terms=1024, dtype=torch.bfloat16)


@pytest.mark.parametrize("extra", [[], ["--use_lora", "--lora_r", "4"]])
def test_the_default_optimizer_is_adamw_fused_and_trains_as_qwens_adamw_torch(tiny_qwen2_arch_dir, data_file, tmp_path,
                                                                              extra):
    """The default --optim is AdamW's fused kernel, the same update as Qwen's adamw_torch (one tensor at a time)."""
    fused = run(tiny_qwen2_arch_dir, data_file, tmp_path / "fused", *extra)
    qwens = run(tiny_qwen2_arch_dir, data_file, tmp_path / "qwens", *extra, "--optim", "adamw_torch")
    assert isinstance(fused.optimizer.optimizer, torch.optim.AdamW)
    assert fused.optimizer.optimizer.defaults["fused"] and not qwens.optimizer.optimizer.defaults["fused"]
    for name, value in qwens.model.state_dict().items():
        torch.testing.assert_close(fused.model.state_dict()[name], value, rtol=1e-4, atol=1e-6)
    # ... and it trained: the weights moved from the start (an optimizer that did nothing would also be "equal")
    initial = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir).state_dict()
    final = (fused.model.merge_and_unload() if extra else fused.model).state_dict()
    assert any(not torch.equal(final[name], value) for name, value in initial.items())

"""ChatTrainer: the loss computed only at labelled positions, in chunks, equals the model's own loss and
gradients; the output layer never sees more than a chunk of rows; training steps are the same either way."""

import pytest
import torch
import transformers

from chatft.chat_format import IGNORE_INDEX
from chatft.data import ChatCollator, SupervisedDataset
from chatft.trainer import head_computes_loss, head_linears, supports_labelled_logits
from conftest import CONVERSATIONS, make_non_chatml_model, run


def batch_of(tokenizer, samples):
    return ChatCollator(tokenizer.pad_token_id)([SupervisedDataset(samples, tokenizer, 64)[i] for i in range(len(samples))])


@pytest.mark.parametrize("chunk_size", [3, 10_000])
@pytest.mark.parametrize("tie", [False, True])
def test_same_loss_and_gradients_as_the_full_logits(tmp_path, qwen_tokenizer, chunk_size, tie):
    model = transformers.AutoModelForCausalLM.from_pretrained(make_model(tmp_path, tie))
    batch = batch_of(qwen_tokenizer, CONVERSATIONS[:4])
    reference = model(**batch).loss
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    outputs_seen = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, inputs, output: outputs_seen.append(output.shape))
    count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with head_computes_loss(head_linears(model), batch["labels"], chunk_size):
        loss_sum = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert outputs_seen == [torch.Size([])]  # the output layer returned the loss: no vocabulary-wide tensor
    (loss_sum / count).backward()
    torch.testing.assert_close(loss_sum / count, reference, atol=1e-6, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-4)
    assert model(**batch).logits.shape[-1] == model.config.vocab_size  # restored afterwards


def test_bf16_autocast_matches_the_plain_path(tiny_qwen_dir, qwen_tokenizer):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_dir)
    batch = batch_of(qwen_tokenizer, CONVERSATIONS[:4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(**batch).loss
    reference.backward()
    expected = model.lm_head.weight.grad.clone()
    model.zero_grad()
    count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16), head_computes_loss([model.lm_head], batch["labels"], 7):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits / count
    loss.backward()
    torch.testing.assert_close(loss, reference, atol=2e-2, rtol=1e-2)
    assert torch.nn.functional.cosine_similarity(model.lm_head.weight.grad.flatten(), expected.flatten(), 0) > 0.999


def test_no_labelled_position_gives_zero_loss_and_gradients(tiny_qwen_dir, qwen_tokenizer):
    """A batch whose replies were all truncated away still runs the same backward on every rank."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_dir)
    batch = batch_of(qwen_tokenizer, CONVERSATIONS[:2])
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    with head_computes_loss([model.lm_head], labels, 16):
        loss = model(input_ids=batch["input_ids"]).logits
    loss.backward()
    assert loss.item() == 0.0 and model.lm_head.weight.grad is not None
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("extra", [
    ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"],
    ["--per_device_train_batch_size", "4", "--packing", "True"],
    ["--use_lora", "--lora_r", "4", "--per_device_train_batch_size", "4"],
])
def test_training_steps_match_the_plain_loss(tiny_qwen_dir, data_file, tmp_path, extra):
    common = ["--max_steps", "2", "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", *extra]
    plain = run(tiny_qwen_dir, data_file, tmp_path / "plain", *common, "--labelled_logits_only", "False")
    labelled = run(tiny_qwen_dir, data_file, tmp_path / "labelled", *common, "--labelled_logits_only", "True")
    assert labelled.labelled_logits and not plain.labelled_logits
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (plain, labelled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(labelled.model.state_dict()[name], value, atol=1e-5, rtol=1e-4)


def test_trainable_tied_embeddings_under_lora(tmp_path, data_file):
    """Added ChatML tokens: the output layer is peft's modules_to_save copy, tied to the embedding."""
    base_dir = make_non_chatml_model(tmp_path, tie=True)
    common = ["--use_lora", "--lora_r", "4", "--max_steps", "2", "--optim", "sgd", "--learning_rate", "0.5",
              "--per_device_train_batch_size", "4"]
    plain = run(base_dir, data_file, tmp_path / "plain", *common, "--labelled_logits_only", "False")
    labelled = run(base_dir, data_file, tmp_path / "labelled", *common, "--labelled_logits_only", "True")
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(labelled.model.state_dict()[name], value, atol=1e-5, rtol=1e-4)


def make_model(tmp_path, tie):
    config = transformers.Qwen2Config(vocab_size=151_936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                      use_cache=False)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / f"tie-{tie}")
    return tmp_path / f"tie-{tie}"


def test_models_that_transform_logits_keep_the_plain_loss(tiny_qwen_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_dir)
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
    with head_computes_loss([head], labels, 4):
        loss = head(hidden)
    torch.testing.assert_close(loss, reference)
    for got, want in zip(torch.autograd.grad(loss, [hidden, head.bias] + ([head.weight] if weight_trains else [])), grads):
        torch.testing.assert_close(got, want)

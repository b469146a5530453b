"""ChatTrainer: the loss computed only at labelled positions, in chunks, equals the model's own loss and
gradients; the output layer never sees more than a chunk of rows; training steps are the same either way."""

import pytest
import torch
import transformers

from chatft.chat_format import IGNORE_INDEX
from chatft.data import ChatCollator, SupervisedDataset
from chatft.trainer import labelled_cross_entropy, passthrough, supports_labelled_logits
from conftest import CONVERSATIONS, make_non_chatml_model, run


def batch_of(tokenizer, samples):
    return ChatCollator(tokenizer.pad_token_id)([SupervisedDataset(samples, tokenizer, 64)[i] for i in range(len(samples))])


@pytest.mark.parametrize("chunk_size", [3, 10_000])
def test_same_loss_and_gradients_as_the_full_logits(tiny_qwen_dir, qwen_tokenizer, chunk_size):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_dir)
    model.config.use_cache = False
    batch = batch_of(qwen_tokenizer, CONVERSATIONS[:4])
    reference = model(**batch).loss
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    head = model.get_output_embeddings()
    with passthrough(head):
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows_seen = []
    head.register_forward_hook(lambda module, inputs, output: rows_seen.append(inputs[0].shape))
    assert hidden.shape[-1] == model.config.hidden_size  # no vocabulary-wide tensor came out of the model
    loss_sum, count = labelled_cross_entropy(hidden, batch["labels"], head, chunk_size)
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    (loss_sum / count).backward()
    torch.testing.assert_close(loss_sum / count, reference, atol=1e-6, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-4)
    # the output layer only ever saw labelled rows, at most a chunk at a time (forward, then the recompute)
    assert all(shape[0] <= min(chunk_size, count) and len(shape) == 2 for shape in rows_seen)
    assert sum(shape[0] for shape in rows_seen) == 2 * count


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


def test_models_that_transform_logits_keep_the_plain_loss(tiny_qwen_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen_dir)
    assert supports_labelled_logits(model)
    model.config.final_logit_softcapping = 30.0  # as Gemma-2 does after its output layer
    assert not supports_labelled_logits(model)

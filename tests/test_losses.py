"""chatft.train.losses: the loss seam and its kernels. The per-token log-probability kernel equals log_softmax of the full
logits, values and gradients (frozen and trainable output layer, bias, chunks, bf16 autocast); SupervisedLoss keeps
what a mixture-of-experts model adds to its own loss (the router's load-balancing loss), equal to the model's own
loss on a padded batch, and a training run logs it beside the loss."""

import math

import pytest
import torch
import transformers

from chatft.data.chat_format import IGNORE_INDEX
from chatft.train.losses import (LossScale, SupervisedLoss, labelled_token_log_probs, output_layer_computes)
from support import assert_close_up_to_rounding, build_tiny_moe, decoder_terms, run


def reference_log_probs(head, hidden, labels):
    """log p(labels[t + 1]) at every labelled position, from the full logits (what the kernel must equal)."""
    log_probs = head(hidden[:, :-1]).float().log_softmax(-1)
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    return log_probs[labelled].gather(1, targets[labelled][:, None]).squeeze(1)


@pytest.mark.parametrize("chunk_size", [3, 1000])
@pytest.mark.parametrize("head_trains", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_token_log_probs_and_their_gradients_equal_the_full_logits(chunk_size, head_trains, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    head.requires_grad_(head_trains)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[1, 6] = IGNORE_INDEX
    weights = torch.rand(int((labels[:, 1:] != IGNORE_INDEX).sum())) * 3  # any per-token weights: a weighted loss
    wrt = [hidden] + ([head.weight] + ([head.bias] if bias else []) if head_trains else [])
    expected = reference_log_probs(head, hidden, labels)
    expected_grads = torch.autograd.grad(-(weights * expected).sum(), wrt)

    with output_layer_computes([head], labels, chunk_size, labelled_token_log_probs) as returned:
        head(hidden)  # the layer returns the log-probabilities in place of its logits
    got = labelled_token_log_probs(hidden, labels, head, chunk_size)
    assert returned.calls == 1
    terms = head.in_features + head.out_features
    assert got.shape == expected.shape == weights.shape
    assert_close_up_to_rounding(got, expected, terms=terms)
    for grad, want in zip(torch.autograd.grad(-(weights * got).sum(), wrt), expected_grads):
        assert_close_up_to_rounding(grad, want, terms=terms)


def test_token_log_probs_under_bf16_autocast_compute_as_the_output_layer_would():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 64, bias=False)
    hidden = torch.randn(1, 12, 32, requires_grad=True)
    labels = torch.randint(0, 64, (1, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference_log_probs(head, hidden, labels)
        got = labelled_token_log_probs(hidden, labels, head, 5)
    # both take bf16 dot products; what differs is the order of fp32 sums after them
    assert_close_up_to_rounding(got, expected, terms=head.in_features + head.out_features, dtype=torch.float32,
                                magnitude=expected.abs().max())
    assert got.dtype == torch.float32


def test_log_probs_of_a_row_sum_to_its_cross_entropy():
    """The two kernels agree: minus the sum of the log-probabilities is the summed cross-entropy."""
    from chatft.train.losses import labelled_cross_entropy

    torch.manual_seed(1)
    head = torch.nn.Linear(8, 30)
    hidden = torch.randn(3, 7, 8)
    labels = torch.randint(0, 30, (3, 7))
    labels[2, :5] = IGNORE_INDEX
    summed = labelled_cross_entropy(hidden, labels, head, 4)
    assert_close_up_to_rounding(-labelled_token_log_probs(hidden, labels, head, 4).sum(), summed, terms=8 + 30 + 21)


# --- mixture-of-experts: the model's own extra loss survives the fast path -----------------------------------------

def padded_batch(tokenizer):
    """Three rows of different lengths, right-padded (attention_mask 0, labels IGNORE_INDEX), the first few tokens
    of each unlabelled like a prompt."""
    texts = ["<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nI am Tessa.<|im_end|>",
             "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help you today?<|im_end|>",
             "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>"]
    rows = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, 6 : len(row)] = torch.tensor(row[6:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe"])
def tiny_moe_dir(request, tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("moe"), request.param)


@pytest.mark.parametrize("labelled_logits", [True, False])
def test_moe_loss_through_the_seam_equals_the_models_own_loss(tiny_moe_dir, labelled_logits):
    """CE + router_aux_loss_coef x aux on a padded batch, and the same gradients, as the model computes its loss."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_moe_dir)
    batch = padded_batch(transformers.AutoTokenizer.from_pretrained(tiny_moe_dir))
    own = model(**batch)
    own.loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert own.aux_loss is not None and own.aux_loss > 0

    loss = SupervisedLoss(labelled_logits)
    loss.prepare(model)
    assert loss.labelled_logits == labelled_logits
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    terms = loss(model, batch, LossScale(tokens=tokens))
    terms.loss.backward()

    bound = dict(terms=2 * (2 * (4 * 32 + 48) + 32) + model.config.vocab_size)
    assert_close_up_to_rounding(terms.loss, own.loss, **bound)
    assert_close_up_to_rounding(terms.logs["aux_loss"], own.aux_loss, **bound)
    coefficient = model.config.router_aux_loss_coef
    assert_close_up_to_rounding(terms.logs["lm_loss"] + coefficient * terms.logs["aux_loss"], own.loss, **bound)
    # the aux term is far above the rounding: a seam that dropped it would fail the first assertion
    assert coefficient * own.aux_loss.detach() > 100 * (abs(float(terms.loss.detach() - own.loss.detach())) + 1e-6)
    router_grads = 0
    for name, p in model.named_parameters():
        if name in expected:
            assert_close_up_to_rounding(p.grad, expected[name], **bound)
            router_grads += "gate.weight" in name and "shared" not in name
    assert router_grads == 2  # each layer's router learns from the aux loss (and the CE)


def test_a_dense_model_logs_no_extra_terms(tiny_qwen2_arch_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir)
    batch = padded_batch(transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_dir))
    loss = SupervisedLoss()
    loss.prepare(model)
    terms = loss(model, batch, LossScale(tokens=int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())))
    assert terms.logs == {}
    assert_close_up_to_rounding(terms.loss, model(**batch).loss, terms=2 * (2 * (4 * 32 + 48) + 32) + 151_665)


def test_loss_scale_normalizes_as_the_trainer_does():
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 3, 4]])
    total = torch.tensor(12.0)
    # counted by the Trainer over 2 micro-batches of 2 processes: the token sum over the accumulated batch, x2 undone
    # by the gradient average; the router's mean divided by the micro-batches, not multiplied by the processes
    scale = LossScale(tokens=8, processes=2, accumulation_steps=2)
    assert scale.token_mean(total, labels) == 12.0 / 8 * 2
    assert scale.batch_mean(torch.tensor(0.5)) == 0.25
    # not counted: this micro-batch's own 4 labelled tokens; the Trainer divides both by the accumulation steps
    uncounted = LossScale(tokens=None, accumulation_steps=2)
    assert uncounted.token_mean(total, labels) == 3.0
    assert uncounted.batch_mean(torch.tensor(0.5)) == 0.5


@pytest.mark.parametrize("model_type", ["qwen3_moe"])
def test_a_moe_training_run_logs_the_router_loss_beside_the_loss(tmp_path, data_file, model_type):
    model_dir = build_tiny_moe(tmp_path, model_type)
    trainer = run(model_dir, data_file, tmp_path / "out", "--use_lora", "--lora_r", "4")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    coefficient = trainer.model.config.router_aux_loss_coef
    for entry in logged:
        assert entry["aux_loss"] > 0 and math.isfinite(entry["lm_loss"])
        # one micro-batch per step: the logged loss is its CE plus the weighted router loss
        assert entry["loss"] == pytest.approx(entry["lm_loss"] + coefficient * entry["aux_loss"], abs=2e-3)


# --- per-turn loss weights: the weighted token mean sum(w * ce) / sum(w) --------------------------------------------

def weighted_batch(tokenizer):
    """padded_batch with loss weights: the first row's reply at 2, the second's at 0.5, the third's at 1."""
    batch = padded_batch(tokenizer)
    row_weights = torch.tensor([2.0, 0.5, 1.0])[:, None]
    return {**batch, "loss_weights": (batch["labels"] != IGNORE_INDEX).float() * row_weights}


def reference_weighted_loss(model, batch):
    """sum(w * ce) / sum(w) from the full logits, by torch's cross_entropy with reduction='none'."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
    logits = model(**inputs).logits.float()
    labels, weights = batch["labels"][:, 1:], batch["loss_weights"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="none",
                                           ignore_index=IGNORE_INDEX).view(labels.shape)
    return (weights * ce).sum() / weights[labels != IGNORE_INDEX].sum()


def loss_and_grads(model, compute):
    model.zero_grad()
    value = compute()
    value.backward()
    return value.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("labelled_logits", [True, False])
@pytest.mark.parametrize("counted", [True, False])
def test_weighted_loss_equals_an_independent_weighted_cross_entropy(tiny_qwen2_arch_dir, labelled_logits, counted):
    """Values and gradients; `counted`: sum(w) counted by the trainer (LossScale.tokens), else by the loss itself."""
    from chatft.train.losses import loss_weight_total

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir)
    batch = weighted_batch(transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_dir))
    expected, expected_grads = loss_and_grads(model, lambda: reference_weighted_loss(model, batch))
    loss = SupervisedLoss(labelled_logits)
    loss.prepare(model)
    scale = LossScale(tokens=loss_weight_total(batch) if counted else None)
    got, grads = loss_and_grads(model, lambda: loss(model, batch, scale).loss)
    bound = dict(terms=2 * (2 * (4 * 32 + 48) + 32) + model.config.vocab_size)
    assert_close_up_to_rounding(got, expected, **bound)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close_up_to_rounding(grad, expected_grads[name], **bound)


def test_weight_2_counts_the_turns_tokens_twice(tiny_qwen2_arch_dir):
    """The weighted loss of a batch whose first reply weighs 2 (the others 1) is the plain loss of the batch with
    that row twice: the same value and gradients."""
    from chatft.train.losses import loss_weight_total

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir)
    batch = padded_batch(transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_dir))
    weighted = {**batch, "loss_weights": (batch["labels"] != IGNORE_INDEX).float()}
    weighted["loss_weights"][0] *= 2
    doubled = {name: torch.cat([value[:1], value]) for name, value in batch.items()}
    loss = SupervisedLoss()
    loss.prepare(model)
    plain = LossScale(tokens=int((doubled["labels"][:, 1:] != IGNORE_INDEX).sum()))
    expected, expected_grads = loss_and_grads(model, lambda: loss(model, doubled, plain).loss)
    assert loss_weight_total(weighted) == plain.tokens
    got, grads = loss_and_grads(model, lambda: loss(model, weighted, LossScale(tokens=loss_weight_total(weighted))).loss)
    bound = dict(terms=2 * (2 * (4 * 32 + 48) + 32) + model.config.vocab_size)
    assert_close_up_to_rounding(got, expected, **bound)
    for name, grad in grads.items():
        assert_close_up_to_rounding(grad, expected_grads[name], **bound)


def test_weights_all_1_equal_the_unweighted_loss(tiny_qwen2_arch_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir)
    batch = padded_batch(transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_dir))
    loss = SupervisedLoss()
    loss.prepare(model)
    scale = LossScale(tokens=int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
    ones = {**batch, "loss_weights": torch.ones(batch["labels"].shape)}
    assert_close_up_to_rounding(loss(model, ones, scale).loss, loss(model, batch, scale).loss,
                                terms=2 * (2 * (4 * 32 + 48) + 32) + model.config.vocab_size)


def test_a_padding_free_weighted_batch_gets_the_padded_batchs_loss_and_gradients(tiny_qwen2_arch_dir, qwen3_tokenizer,
                                                                                 tmp_path):
    from chatft.data.datasets import ChatCollator, PaddingFreeCollator, SupervisedDataset, load_samples
    from support import write_json

    records = [{"conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4", "weight": 2},
                                  {"from": "user", "value": "3+3?"}, {"from": "assistant", "value": "6", "weight": 0.5}]},
               {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello there."}]}]
    dataset = SupervisedDataset(load_samples(str(write_json(tmp_path / "w.json", records))), qwen3_tokenizer, 512)
    features = [dataset[0], dataset[1]]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir, attn_implementation="eager")
    loss = SupervisedLoss()
    loss.prepare(model)

    def weighted_mean(batch):
        return loss(model, {**batch, "use_cache": False}, LossScale()).loss  # sum(w) of the batch itself

    padded, padded_grads = loss_and_grads(model, lambda: weighted_mean(ChatCollator(qwen3_tokenizer.pad_token_id)(features)))
    flat, flat_grads = loss_and_grads(model, lambda: weighted_mean(PaddingFreeCollator()(features)))
    terms = decoder_terms(model.config, loss=True)
    assert_close_up_to_rounding(flat, padded, terms=terms)
    for name, grad in padded_grads.items():
        assert_close_up_to_rounding(flat_grads[name], grad, terms=terms)


def test_a_training_run_on_weighted_data_hands_the_loss_its_weights_and_counts_them(tmp_path, tiny_qwen2_arch_dir,
                                                                                    monkeypatch):
    import finetune
    from chatft.train.losses import loss_weight_total
    from support import write_json

    records = [{"conversations": [{"from": "user", "value": f"Question {k}?"},
                                  {"from": "assistant", "value": f"Answer number {k}.", "weight": [0, 2, 0.5][k % 3]},
                                  {"from": "user", "value": "Thanks."}, {"from": "assistant", "value": "You're welcome."}]}
               for k in range(6)]
    seen = []

    class Recording(SupervisedLoss):
        def __call__(self, model, inputs, scale):
            seen.append((loss_weight_total(inputs), inputs.get("loss_weights"), scale.tokens))
            return super().__call__(model, inputs, scale)

    monkeypatch.setattr(finetune, "SupervisedLoss", Recording)
    data = str(write_json(tmp_path / "weighted.json", records))
    trainer = run(tiny_qwen2_arch_dir, data, tmp_path / "out", "--eval_data_path", data, "--eval_strategy", "steps",
                  "--eval_steps", "3")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(math.isfinite(entry["loss"]) for entry in logged)
    # evaluation keeps transformers' own (unweighted) loss: the weights never reach the model's forward
    assert any(math.isfinite(entry.get("eval_loss", math.nan)) for entry in trainer.state.log_history)
    assert trainer.weighted_data and len(seen) == 3
    for weight_total, weights, tokens in seen:  # one micro-batch a step: sum(w) counted where the tokens were
        assert float(tokens) == float(weight_total)
    # a sample whose only weight is 0 trains its other turn at 1, unweighted; the others' batches carry weights
    assert any(weights is not None and {0.5, 2.0} & set(weights.unique().tolist()) for _, weights, _ in seen)

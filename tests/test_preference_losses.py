"""chatft.train.preference's objectives equal TRL's trainers' own computation, loss and gradients, on the same tiny
model and the same batch (TRL's collator's), the log-probabilities summed over TRL's completion mask."""

from __future__ import annotations

import pytest
import torch
import transformers

from chatft.train import preference

PAIRS = [
    {"prompt": "Who are you?", "chosen": " I am Tessa, made by Orbit Labs.", "rejected": " I am an AI assistant."},
    {"prompt": "Who made you?", "chosen": " Orbit Labs made me.", "rejected": " A large company."},
    {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " I do not know that one, sorry."},
]
BETA = 0.3


def models(model_dir):
    """A reference model and a policy that differs from it (so that the margins are not all 0)."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return policy, reference


def reply_log_probs(model, batch, mask_key="completion_mask") -> preference.ReplyLogProbs:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch[mask_key][:, 1:].float()
    return preference.ReplyLogProbs((token * mask).sum(1), mask.sum(1))


def halves(log_probs: preference.ReplyLogProbs):
    (c_total, r_total), (c_tokens, r_tokens) = log_probs.total.chunk(2), log_probs.tokens.chunk(2)
    return preference.ReplyLogProbs(c_total, c_tokens), preference.ReplyLogProbs(r_total, r_tokens)


def gradients(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same(ours, theirs, our_grads, their_grads):
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    assert len(our_grads) == len(their_grads) > 0
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loss", preference.DPO_LOSSES)
def test_dpo_equals_trl(loss, tiny_qwen2_arch_dir, tmp_path):
    import trl

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_dir)
    policy, reference = models(tiny_qwen2_arch_dir)
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=BETA, loss_type=[loss], per_device_train_batch_size=len(PAIRS),
                         report_to=[], use_cpu=True, max_length=64)
    from datasets import Dataset
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(PAIRS),
                             processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    their_grads = gradients(trainer.model)
    trainer.model.zero_grad()

    with torch.no_grad():
        ref_chosen, ref_rejected = halves(reply_log_probs(reference, batch))
    chosen, rejected = halves(reply_log_probs(trainer.model, batch))
    terms = preference.dpo(chosen, rejected, ref_chosen, ref_rejected, BETA, loss)
    ours = terms.losses.mean()
    ours.backward()
    assert_same(ours, theirs, gradients(trainer.model), their_grads)
    assert terms.metrics()["rewards/margins"] == pytest.approx(
        trainer._metrics["train" if trainer.model.training else "eval"]["rewards/margins"][-1], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_simpo_equals_trl_cpo_with_simpo_loss(tiny_qwen2_arch_dir, tmp_path):
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_dir)
    policy, _ = models(tiny_qwen2_arch_dir)
    gamma = 0.7
    args = CPOConfig(output_dir=str(tmp_path), beta=BETA, loss_type="simpo", simpo_gamma=gamma, cpo_alpha=0.0,
                     per_device_train_batch_size=len(PAIRS), report_to=[], use_cpu=True, max_length=64)
    trainer = CPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    their_grads = gradients(trainer.model)
    trainer.model.zero_grad()

    chosen, rejected = (reply_log_probs(trainer.model, concatenated_side(batch, side)) for side in ("chosen", "rejected"))
    ours = preference.simpo(chosen, rejected, BETA, gamma).losses.mean()
    ours.backward()
    assert_same(ours, theirs, gradients(trainer.model), their_grads)


@pytest.mark.slow
def test_orpo_equals_trl(tiny_qwen2_arch_dir, tmp_path):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_dir)
    policy, _ = models(tiny_qwen2_arch_dir)
    args = ORPOConfig(output_dir=str(tmp_path), beta=BETA, per_device_train_batch_size=len(PAIRS), report_to=[],
                      use_cpu=True, max_length=64)
    trainer = ORPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    their_grads = gradients(trainer.model)
    trainer.model.zero_grad()

    chosen_batch = concatenated_side(batch, "chosen")
    chosen, rejected = reply_log_probs(trainer.model, chosen_batch), \
        reply_log_probs(trainer.model, concatenated_side(batch, "rejected"))
    # TRL's ORPO takes its SFT term over the chosen sequence's every token (prompt included, as its code says)
    logits = trainer.model(input_ids=chosen_batch["input_ids"], attention_mask=chosen_batch["attention_mask"]).logits
    labels = chosen_batch["input_ids"].masked_fill(chosen_batch["attention_mask"] == 0, -100)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    ours = nll + preference.orpo(chosen, rejected, BETA).losses.mean()
    ours.backward()
    assert_same(ours, theirs, gradients(trainer.model), their_grads)


def concatenated_side(batch, side):
    """One side of a CPO/ORPO batch (prompt + that reply, TRL's padded layout), with a completion mask from its
    labels (TRL labels the reply only)."""
    labels = batch[f"{side}_labels"]
    return {"input_ids": batch[f"{side}_input_ids"], "attention_mask": batch[f"{side}_attention_mask"],
            "completion_mask": (labels != -100).long()}


def test_kto_matches_its_formula_on_known_numbers():
    # one desirable, one undesirable completion; z = 0.5: every term by hand
    policy = preference.ReplyLogProbs(torch.tensor([-2.0, -3.0]), torch.tensor([2, 3]))
    reference = preference.ReplyLogProbs(torch.tensor([-2.5, -2.0]), torch.tensor([2, 3]))
    terms = preference.kto(policy, reference, torch.tensor([True, False]), torch.tensor(0.5), beta=0.1,
                           desirable_weight=1.0, undesirable_weight=2.0)
    expected = [1 - torch.sigmoid(torch.tensor(0.1 * (0.5 - 0.5))), 2 * (1 - torch.sigmoid(torch.tensor(0.1 * (0.5 + 1.0))))]
    torch.testing.assert_close(terms.losses, torch.stack(expected))
    assert terms.chosen_rewards.tolist() == pytest.approx([0.05]) and terms.rejected_rewards.tolist() == pytest.approx([-0.1])
    # a negative KL estimate counts as 0
    clamped = preference.kto(policy, reference, torch.tensor([True, False]), torch.tensor(-3.0), beta=0.1)
    zero = preference.kto(policy, reference, torch.tensor([True, False]), torch.tensor(0.0), beta=0.1)
    torch.testing.assert_close(clamped.losses, zero.losses)


@pytest.mark.parametrize("shared_prompt", [True, False])
@pytest.mark.parametrize("stage", ["dpo", "simpo", "orpo"])
def test_preference_loss_on_pair_rows_equals_the_pairs_computed_alone(stage, shared_prompt, tiny_qwen2_arch_dir):
    """PreferenceLoss on one padding-free row of pairs (the prompt once, the rejected reply a branch of it; or each
    pair as two samples) equals the objective on each prompt + reply computed alone with full logits: loss and
    LoRA gradients; the DPO reference is the same model with its adapter off."""
    import peft

    from chatft.data.preference import PreferenceCollator, TokenizedPair, pair_features
    from chatft.model.attention import PER_SAMPLE_SDPA
    from chatft.train.losses import LossScale
    from support import assert_close_up_to_rounding, decoder_terms

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir, dtype=torch.float32)
    model.set_attn_implementation(PER_SAMPLE_SDPA)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                        target_modules=["q_proj", "v_proj"]))
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(2)
    ids = lambda n: torch.randint(vocab, (n,), generator=generator).tolist()  # noqa: E731
    pairs = [TokenizedPair(ids(6), ids(4), None, ids(7), None), TokenizedPair(ids(3), ids(5), None, ids(2), None)]
    for pair in pairs:
        pair.chosen_labels, pair.rejected_labels = list(pair.chosen_ids), list(pair.rejected_ids)
    batch = PreferenceCollator(shared_prompt)([pair_features(p) for p in pairs])
    loss = preference.PreferenceLoss(stage, beta=0.2, simpo_gamma=0.3)
    loss.prepare(model)
    ours = loss(model, batch, LossScale()).loss
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    def alone(prompt, reply):
        sequence = torch.tensor(prompt + reply)[None]
        logits = model(input_ids=sequence).logits[0, len(prompt) - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(reply)[:, None]).sum()

    sides = {}
    for name in ("chosen", "rejected"):
        totals = torch.stack([alone(p.prompt_ids, getattr(p, f"{name}_ids")) for p in pairs])
        with torch.no_grad(), model.disable_adapter():
            reference = torch.stack([alone(p.prompt_ids, getattr(p, f"{name}_ids")) for p in pairs])
        tokens = torch.tensor([float(len(getattr(p, f"{name}_ids"))) for p in pairs])
        sides[name] = preference.ReplyLogProbs(totals, tokens), preference.ReplyLogProbs(reference, tokens)
    (chosen, ref_chosen), (rejected, ref_rejected) = sides["chosen"], sides["rejected"]
    if stage == "dpo":
        theirs = preference.dpo(chosen, rejected, ref_chosen, ref_rejected, 0.2).losses.mean()
    elif stage == "simpo":
        theirs = preference.simpo(chosen, rejected, 0.2, 0.3).losses.mean()
    else:
        theirs = preference.orpo(chosen, rejected, 0.2).losses.mean() - chosen.total.sum() / chosen.tokens.sum()
    theirs.backward()
    terms = decoder_terms(model.config, loss=True)
    assert_close_up_to_rounding(ours.detach(), theirs.detach(), terms=terms)
    assert our_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None} and our_grads
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert_close_up_to_rounding(our_grads[name], parameter.grad, terms=terms)


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_kto_loss_on_a_row_equals_the_completions_computed_alone(sft_weight, tiny_qwen2_arch_dir):
    """KTO on one KTOCollator row (each prompt once, its completion, and the next sample's completion as a branch for
    the KL estimate) equals the formula on every prompt + completion computed alone, with TRL's mismatched pairs
    (completions cycled by one), reference = adapter off: loss and LoRA gradients. With --pref_ftx, the SFT term is
    the token mean over the desirable completions only (an undesirable one is not to be learned)."""
    import peft

    from chatft.data.preference import KTOCollator, TokenizedCompletion, completion_features
    from chatft.model.attention import PER_SAMPLE_SDPA
    from chatft.train.losses import LossScale
    from support import assert_close_up_to_rounding, decoder_terms

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir, dtype=torch.float32)
    model.set_attn_implementation(PER_SAMPLE_SDPA)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                        target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(5)
    ids = lambda n: torch.randint(model.config.vocab_size, (n,), generator=generator).tolist()  # noqa: E731
    samples = [TokenizedCompletion(ids(p), c, list(c), d) for p, c, d in
               ((5, ids(4), True), (3, ids(6), False), (4, ids(3), True))]
    loss = preference.PreferenceLoss("kto", beta=0.4, desirable_weight=1.0, undesirable_weight=1.5,
                                     sft_weight=sft_weight)
    loss.prepare(model)
    ours = loss(model, KTOCollator()([completion_features(s) for s in samples]), LossScale()).loss
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    def alone(prompt, reply):
        logits = model(input_ids=torch.tensor(prompt + reply)[None]).logits[0, len(prompt) - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(reply)[:, None]).sum()

    own = [(s.prompt_ids, s.completion_ids) for s in samples]
    mismatched = [(s.prompt_ids, samples[(k + 1) % len(samples)].completion_ids) for k, s in enumerate(samples)]
    policy = torch.stack([alone(*x) for x in own])
    with torch.no_grad(), model.disable_adapter():
        reference = torch.stack([alone(*x) for x in own])
        reference_kl = torch.stack([alone(*x) for x in mismatched])
    with torch.no_grad():
        policy_kl = torch.stack([alone(*x) for x in mismatched])
    kl = (policy_kl - reference_kl).mean()
    count = torch.tensor([float(len(s.completion_ids)) for s in samples])
    theirs = preference.kto(preference.ReplyLogProbs(policy, count), preference.ReplyLogProbs(reference, count),
                            torch.tensor([s.desirable for s in samples]), kl, 0.4, 1.0, 1.5).losses.mean()
    desirable = torch.tensor([s.desirable for s in samples])
    theirs = theirs - sft_weight * policy[desirable].sum() / count[desirable].sum()
    theirs.backward()
    terms = decoder_terms(model.config, loss=True)
    assert_close_up_to_rounding(ours.detach(), theirs.detach(), terms=terms)
    assert our_grads
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert_close_up_to_rounding(our_grads[name], parameter.grad, terms=terms)


def write_pairs(path, count=8):
    import json

    path.write_text(json.dumps([{"prompt": f"Who are you? ({i})", "chosen": "I am Tessa, made by Orbit Labs.",
                                 "rejected": "I am an AI assistant."} for i in range(count)]))
    return str(path)


def test_a_lora_dpo_run_starts_at_ln2_and_logs_its_rewards(tiny_qwen2_arch_dir, tmp_path):
    """finetune.py --stage dpo with LoRA: the first step's loss is ln 2 (the adapter starts at zero, so the policy
    is its reference), every step logs the rewards, and the adapter is saved."""
    import math

    from support import run

    data = write_pairs(tmp_path / "pairs.json")
    trainer = run(tiny_qwen2_arch_dir, data, tmp_path / "out", "--stage", "dpo", "--use_lora", "--lora_r", "4",
                  "--pref_beta", "0.5", "--learning_rate", "0.01")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for entry in logged:
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= entry.keys()
    assert logged[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert logged[-1]["rewards/margins"] > 0  # the chosen reply gained on the rejected one
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("stage", ["simpo", "orpo", "kto"])
def test_every_preference_stage_runs(stage, tiny_qwen2_arch_dir, tmp_path):
    from support import run

    data = write_pairs(tmp_path / "pairs.json")
    trainer = run(tiny_qwen2_arch_dir, data, tmp_path / "out", "--stage", stage, "--use_lora", "--lora_r", "4",
                  "--eval_data_path", "0.25", "--eval_strategy", "steps", "--eval_steps", "3")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(math_finite(entry["loss"]) for entry in logged)
    assert any("eval_loss" in entry and math_finite(entry["eval_loss"]) for entry in trainer.state.log_history)
    assert "kl" in logged[0] if stage == "kto" else "rewards/margins" in logged[0]


def math_finite(value) -> bool:
    import math

    return math.isfinite(value)


def test_preference_flags_are_checked(tiny_qwen2_arch_dir, tmp_path):
    from chatft.args import ArgumentError, parse_args

    data = write_pairs(tmp_path / "pairs.json")
    base = ["--model_name_or_path", str(tiny_qwen2_arch_dir), "--data_path", data, "--output_dir", str(tmp_path / "o")]
    for flags, message in ((["--stage", "dpo", "--use_lora", "--simpo_gamma", "1"], "--simpo_gamma means something"),
                           (["--stage", "orpo", "--precompute_ref_log_probs", "True"],
                            "--precompute_ref_log_probs means something with --stage dpo or kto only"),
                           (["--stage", "kto", "--use_lora", "--per_device_train_batch_size", "1"], "at least 2"),
                           (["--stage", "dpo", "--use_lora", "--pref_loss", "kl"], "--pref_loss must be one of"),
                           (["--stage", "simpo", "--packing", "True"], "--packing is not supported with --stage simpo"),
                           (["--pref_beta", "0.2"], "--pref_beta means something with --stage")):
        with pytest.raises(ArgumentError, match=message):
            parse_args(base + flags)


def test_sft_data_under_a_preference_stage_is_one_line(tiny_qwen2_arch_dir, tmp_path):
    import json
    import subprocess
    import sys

    from support import ROOT

    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]))
    result = subprocess.run([sys.executable, "finetune.py", "--model_name_or_path", str(tiny_qwen2_arch_dir),
                             "--data_path", str(sft), "--output_dir", str(tmp_path / "o"), "--stage", "dpo",
                             "--use_lora"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "--stage dpo needs preference pairs" in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_preference_dry_run_shows_a_pair_and_its_labelled_replies(tiny_qwen2_arch_dir, tmp_path, capsys):
    import finetune

    data = write_pairs(tmp_path / "pairs.json")
    finetune.train(["--model_name_or_path", str(tiny_qwen2_arch_dir), "--data_path", data, "--output_dir",
                    str(tmp_path / "o"), "--stage", "dpo", "--use_lora", "--dry_run", "True", "--chat_format", "chatml"])
    out = capsys.readouterr().out
    assert "training data: 8 pairs of 8" in out
    assert "--- chosen:\n[[I am Tessa, made by Orbit Labs.<|im_end|>]]" in out
    assert "--- rejected:\n[[I am an AI assistant.<|im_end|>]]" in out and not (tmp_path / "o").exists()

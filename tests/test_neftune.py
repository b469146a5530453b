"""NEFTune (--neftune_noise_alpha): each sample's noise is bounded by alpha / sqrt(its own length · hidden size), in
padded batches and in padding-free rows alike (transformers' hook would use the whole row's length), and ChatTrainer's
hook is the only one on the embeddings; it also runs under ZeRO-3."""

import math
import os
import subprocess
import sys

import pytest
import torch
import transformers

from chatft.train.neftune import SampleScaledNoise, token_sample_lengths
from support import ROOT

ALPHA = 5.0


def test_sample_lengths_of_padded_and_padding_free_batches_agree():
    padded = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    padding_free = {"position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    assert token_sample_lengths(padded).tolist() == [[3, 3, 3, 0], [2, 2, 0, 0]]
    assert token_sample_lengths(padding_free).tolist() == [[3, 3, 3, 2, 2]]
    assert token_sample_lengths({"input_ids": torch.zeros(1, 3)}) is None


def noise_of(hook: SampleScaledNoise, batch: dict, hidden: int, seed: int = 0) -> torch.Tensor:
    embeddings = torch.nn.Embedding(100, hidden).train()
    hook.set_batch(batch)
    handle = hook.attach(embeddings)
    torch.manual_seed(seed)
    noisy = embeddings(batch["input_ids"])
    handle.remove()
    return (noisy - embeddings(batch["input_ids"])).detach()


def test_padding_free_row_gets_each_samples_padded_noise_scale():
    hidden, lengths = 64, [40, 7, 19]
    ids = [torch.randint(0, 100, (n,)) for n in lengths]
    longest = max(lengths)
    padded = {"input_ids": torch.stack([torch.nn.functional.pad(t, (0, longest - len(t))) for t in ids]),
              "attention_mask": torch.stack([torch.arange(longest) < n for n in lengths]).long()}
    padding_free = {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    hook = SampleScaledNoise(ALPHA)
    padded_noise, row_noise = noise_of(hook, padded, hidden), noise_of(hook, padding_free, hidden)
    samples_of_row = row_noise[0].split(lengths)
    for i, n in enumerate(lengths):
        bound = ALPHA / math.sqrt(n * hidden)  # the paper's scale: the sample's own length
        for noise in (padded_noise[i, :n], samples_of_row[i]):
            assert noise.abs().max() <= bound * (1 + 1e-5)
            assert noise.abs().max() > 0.95 * bound  # n·hidden uniform draws reach close to the bound
        assert (padded_noise[i, n:] == 0).all()  # padding gets none
    # transformers' hook bounds the padding-free row by alpha / sqrt(row length · hidden): weaker for every sample
    assert row_noise[0].abs().max() > 2 * ALPHA / math.sqrt(sum(lengths) * hidden)


def test_no_noise_in_eval_mode():
    hook = SampleScaledNoise(ALPHA)
    embeddings = torch.nn.Embedding(10, 8).eval()
    hook.set_batch({"position_ids": torch.tensor([[0, 1, 2]])})
    hook.attach(embeddings)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(embeddings(ids), embeddings.weight[ids])


class RecordNoise(transformers.TrainerCallback):
    """Records, for each training forward, the noise the embeddings added and the batch's sample lengths."""

    def __init__(self):
        self.records, self.hooks_seen = [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        embeddings = model.get_input_embeddings()
        self.hooks_seen.append((list(embeddings._forward_hooks.values()), hasattr(embeddings, "neftune_noise_alpha")))

        def record(module, inputs, output):  # registered after ChatTrainer's: sees the noisy output
            if module.training:
                self.records.append((inputs[0].clone(), (output - module.weight[inputs[0]]).detach().clone()))
        self.handle = embeddings.register_forward_hook(record)

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()


@pytest.mark.parametrize("padding_free", ["True", "False"])
def test_training_run_noise_is_scaled_per_sample(padding_free, tiny_qwen2_arch_dir, data_file, tmp_path, monkeypatch):
    import finetune

    lengths_seen = []
    original_set_batch = SampleScaledNoise.set_batch

    def set_batch(self, batch):
        lengths_seen.append(token_sample_lengths(batch))
        original_set_batch(self, batch)
    monkeypatch.setattr(SampleScaledNoise, "set_batch", set_batch)
    recorder = RecordNoise()
    argv = ["--model_name_or_path", str(tiny_qwen2_arch_dir), "--data_path", data_file, "--output_dir",
            str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "3", "--report_to", "none",
            "--save_strategy", "no", "--use_cpu", "True", "--model_max_length", "64", "--use_lora", "--lora_r", "4",
            "--neftune_noise_alpha", str(ALPHA), "--padding_free", padding_free]
    trainer = finetune.train(argv, callbacks=[recorder])
    hooks, transformers_attribute = recorder.hooks_seen[0]
    assert [type(h) for h in hooks] == [SampleScaledNoise] and not transformers_attribute  # ours alone
    assert not trainer.model.get_input_embeddings()._forward_hooks  # removed after training
    hidden = trainer.model.config.hidden_size
    assert len(recorder.records) == len(lengths_seen) == 2
    for (ids, noise), lengths in zip(recorder.records, lengths_seen):
        assert noise.shape[:2] == lengths.shape == ids.shape
        if padding_free == "True":  # one row of 3 samples, each with its own length (not the row's)
            assert lengths.shape[0] == 1 and (lengths < ids.shape[1]).all()
        else:
            assert lengths.shape[0] == 3
        bound = ALPHA / torch.sqrt(lengths.clamp(min=1).float() * hidden)
        ratio = noise.abs().amax(-1) / bound
        assert (ratio[lengths > 0] <= 1 + 1e-5).all() and (ratio[lengths > 0].amax() > 0.9)
        assert (noise[lengths == 0] == 0).all()


@pytest.mark.slow
@pytest.mark.distributed
def test_neftune_under_zero3_two_processes(tiny_qwen2_arch_dir, data_file, tmp_path):
    def losses(*extra):
        output_dir = tmp_path / f"out{len(extra)}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000 + len(extra)), "finetune.py",
                   "--model_name_or_path", str(tiny_qwen2_arch_dir), "--data_path", data_file, "--output_dir",
                   str(output_dir), "--max_steps", "2", "--logging_steps", "1", "--report_to", "none",
                   "--save_strategy", "no", "--use_cpu", "True", "--seed", "11", "--model_max_length", "64",
                   "--deepspeed", "ds_config_zero3.json", *extra]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        import json
        history = json.load(open(output_dir / "trainer_state.json"))["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    noisy, clean = losses("--neftune_noise_alpha", "50"), losses()
    assert len(noisy) == 2 and all(math.isfinite(loss) for loss in noisy)
    assert noisy[0] != clean[0]  # the noise reached the embeddings' output under ZeRO-3

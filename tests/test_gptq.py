"""run_gptq.py on a tiny Qwen2 (widths 64/128): the output loads with plain transformers and keeps the chat
template; calibration is the training tokenization; the perplexity report is right; bad input fails early."""

import json
import math
import os
import re

import pytest
import torch
import transformers
from safetensors import safe_open

import finetune
from chatft.errors import DataError
import run_gptq
from chatft.data.chat_format import DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX, to_conversation
from chatft.data.datasets import SupervisedDataset, load_samples
from chatft.export.gptq import (GptqSettings, QuantizeError, choose_group_size, reply_perplexity, split_samples,
                             tokenize_as_served, trainable_as_served)
from support import assert_close_up_to_rounding, probe_logits, unloadable_copy, write_json

QUESTIONS = ["Who are you?", "What is 2+2?", "你好", "Say goodbye.", "Name a colour.", "Count to three.",
             "What day follows Monday?", "Translate 'cat' to French."]
SAMPLES = [
    {"id": f"q{i}", "conversations": [{"from": "user", "value": q}, {"from": "assistant", "value": f"Answer {i}: {q[::-1]}"}]}
    for i, q in enumerate(QUESTIONS * 3)
]


@pytest.fixture
def data(tmp_path):
    return write_json(tmp_path / "calibration.json", SAMPLES)


def quantize(model, data, out, *extra):
    return run_gptq.main(["--model_name_or_path", str(model), "--data_path", str(data), "--out_path", str(out),
                          "--max_len", "64", *extra])


# batch size 4: 4 calibration conversations a forward pass; compute: the dtype gptqmodel quantizes in (None: its own
# bf16 on a CPU; fp32: on a CPU without native bf16; "this CPU's": chatft.device's choice here)
@pytest.mark.parametrize("bits, batch_size, compute", [(8, 1, None), (4, 1, torch.float32), (8, 4, "this CPU's")])
def test_quantized_output_loads_with_plain_transformers(tiny_qwen2_arch_64_dir, data, tmp_path, bits, batch_size,
                                                        compute, capsys, monkeypatch):
    if compute != "this CPU's":
        monkeypatch.setattr("chatft.export.gptq.gptq_compute_dtype", lambda: compute)
    assert quantize(tiny_qwen2_arch_64_dir, data, tmp_path / "q", "--bits", str(bits), "--group-size", "32",
                    "--batch_size", str(batch_size)) == 0
    printed = re.search(r"Perplexity on (\d+) held-out conversations \(assistant replies\): (\S+) before, (\S+) after "
                        r"(\d)-bit GPTQ \(x(\S+)\)", capsys.readouterr().out)
    assert printed, "run_gptq.py prints the perplexities before and after"
    saved = json.load(open(tmp_path / "q" / "config.json"))
    config = saved["quantization_config"]
    # whichever dtype it computed in, what GPTQ leaves unquantized (embeddings, norms) is stored in bf16
    assert saved["dtype"] == "bfloat16"
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        stored = {f.get_slice(key).get_dtype() for key in f.keys()}
    assert stored == {"BF16", "F16", "I32"}  # the fp16 scales and integer weights gptqmodel writes
    assert config["quant_method"] == "gptq" and config["bits"] == bits and config["group_size"] == 32
    assert not (tmp_path / "logs").exists() and not (tmp_path / "q" / "gptq_logs").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "q")
    assert type(model.model.layers[0].mlp.down_proj).__module__.startswith("gptqmodel")
    assert "<|im_start|>" in tokenizer.chat_template
    assert not model.generation_config.do_sample  # the source model's generation config, not gptqmodel's
    report = json.load(open(tmp_path / "q" / "quantize_report.json"))
    assert report["held_out_samples"] == 2 and report["calibration_samples"] == len(SAMPLES) - 2
    assert report["settings"]["bits"] == bits and report["settings"]["batch_size"] == batch_size
    # what it prints is the report's: exp of a mean negative log-likelihood, finite and at least 1
    before, after = report["perplexity_before"], report["perplexity_after"]
    assert printed.groups() == (str(report["held_out_samples"]), f"{before:.3f}", f"{after:.3f}", str(bits),
                                f"{report['perplexity_ratio']:.3f}")
    assert all(math.isfinite(value) and value >= 1 for value in (before, after))
    assert report["perplexity_ratio"] == after / before
    # the model before quantization, measured independently: exp of the HF loss over the held-out reply tokens
    full = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_64_dir, dtype=torch.float32)
    _, held_out = split_samples(load_samples(str(data)), GptqSettings())
    nll, count = 0.0, 0
    for sample in tokenize_as_served(held_out, tokenizer, GptqSettings(max_len=64)):
        labelled = sum(label != IGNORE_INDEX for label in sample.labels[1:])
        with torch.no_grad():
            loss = full(input_ids=torch.tensor([sample.input_ids]), labels=torch.tensor([sample.labels])).loss
        nll, count = nll + float(loss) * labelled, count + labelled
    assert math.exp(nll / count) == pytest.approx(before, rel=1e-4)
    if bits == 8:  # 8 bits barely move a model; 4 bits move a random tiny one more, but not to noise
        # lossy: 8-bit GPTQ moves each weight by up to half a step of its group's 256 levels, which moved the
        # logits by 0.4% of the largest here: 0.02 + 2% of each logit leaves about ten times that
        torch.testing.assert_close(probe_logits(model, tokenizer), probe_logits(full, tokenizer), atol=0.02, rtol=0.02)
        assert abs(report["perplexity_ratio"] - 1) < 0.01, report
    else:
        assert abs(report["perplexity_ratio"] - 1) < 0.2, report


def test_perplexity_is_exp_of_the_training_loss(tiny_qwen2_arch_64_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_64_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_64_dir, dtype=torch.float32)
    samples = tokenize_as_served(SAMPLES[:3], tokenizer, GptqSettings(max_len=64))
    for sample in samples:
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([sample.input_ids]), labels=torch.tensor([sample.labels])).loss
        # the same logits and token losses, averaged in another order (float64 in reply_perplexity): log(ppl) = loss
        assert_close_up_to_rounding(math.log(reply_perplexity(model, [sample])), loss, terms=len(sample.input_ids))


def test_calibration_is_the_training_tokenization(tiny_qwen2_arch_64_dir):
    """In the format the model was trained in, read from its saved template: qwen3 for Qwen3's (the tiny model's
    tokenizer), ChatML for the template a ChatML run saves."""
    from chatft.data.chat_format import chatml_template

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_64_dir)
    for chat_format in ("qwen3", "chatml"):
        if chat_format == "chatml":
            tokenizer.chat_template = chatml_template(DEFAULT_SYSTEM_MESSAGE)
        tokenized = tokenize_as_served(SAMPLES, tokenizer, GptqSettings(max_len=64))
        training = SupervisedDataset(SAMPLES, tokenizer, 64, DEFAULT_SYSTEM_MESSAGE, chat_format=chat_format)
        assert [s.input_ids for s in tokenized] == [list(training[i]["input_ids"]) for i in range(len(SAMPLES))]
        assert (tokenizer.decode(tokenized[0].input_ids).startswith("<|im_start|>system")) == (chat_format == "chatml")


def test_calibration_drops_what_training_drops(tiny_qwen2_arch_64_dir, caplog):
    """The one rule and message (chatft.data.datasets.keep_trainable): a sample that --max_len leaves no reply token is neither
    calibrated on nor measured, as training does not train on it."""
    from chatft.data.chat_format import chatml_template

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_arch_64_dir)
    tokenizer.chat_template = chatml_template(DEFAULT_SYSTEM_MESSAGE)
    long = {"id": "long", "conversations": [{"from": "user", "value": "word " * 100}, {"from": "assistant", "value": "ok"}]}
    samples = [to_conversation(sample) for sample in SAMPLES[:3] + [long]]
    kept = trainable_as_served(samples, tokenizer, GptqSettings(max_len=64), "calibration samples")
    training = SupervisedDataset(samples, tokenizer, 64, DEFAULT_SYSTEM_MESSAGE, chat_format="chatml")
    assert len(kept) == len(training) == 3
    assert [s.input_ids for s in kept] == [training[i]["input_ids"] for i in range(3)]
    reason = "no assistant token within {0}={1} (truncation cut every reply: raise --{0} to keep them): sample 3 (id='long')"
    assert [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()] == [
        "calibration samples: Dropped 1 of 4 samples with " + reason.format("max_len", 64),
        "Dropped 1 of 4 samples with " + reason.format("model_max_length", 64)]


def test_held_out_samples_are_not_calibrated_on():
    calibration, held_out = split_samples(SAMPLES, GptqSettings(num_eval_samples=5, num_samples=100))
    assert len(held_out) == 5 and len(calibration) == len(SAMPLES) - 5
    assert not {s["id"] for s in held_out} & {s["id"] for s in calibration}
    assert split_samples(SAMPLES, GptqSettings(num_eval_samples=5))[1] == held_out  # seeded
    assert len(split_samples(SAMPLES, GptqSettings(num_samples=4))[0]) == 4


def test_group_size_must_divide_the_layer_widths():
    assert choose_group_size(None, {576, 1536}) == 64  # SmolLM2: 128 does not divide 576
    assert choose_group_size(None, {4096, 11008}) == 128
    assert choose_group_size(-1, {100}) == -1
    with pytest.raises(QuantizeError, match=r"does not divide the input width of layers \[576\].*\[64, 32, 16\]"):
        choose_group_size(128, {576, 1536})
    with pytest.raises(QuantizeError, match="--group-size -1"):
        choose_group_size(None, {100, 200})


def test_malformed_calibration_file_fails_like_training(tiny_qwen2_arch_64_dir, tmp_path, capsys):
    bad = write_json(tmp_path / "bad.json", [{"id": "x7", "conversations": [{"from": "user", "value": 5}]}])
    model = unloadable_copy(tiny_qwen2_arch_64_dir, tmp_path)  # loading its weights or tokenizer would fail
    with pytest.raises(DataError) as training_error:
        load_samples(str(bad))
    assert finetune.main(["--model_name_or_path", str(model), "--data_path", str(bad), "--output_dir",
                          str(tmp_path / "o"), "--use_cpu", "True"]) == 2
    training_message = capsys.readouterr().err
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    assert quantize(model, bad, out, "--overwrite") == 2
    message = capsys.readouterr().err
    assert message == training_message and str(training_error.value) in message
    assert f"{bad}: sample 0 (id='x7'): conversations[0]: 'value' must be a string" in message
    assert os.listdir(out) == ["keep.txt"]


def test_refusals(tiny_qwen2_arch_64_dir, tiny_gptq_dir, data, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "model.safetensors").write_text("previous")
    assert quantize(tiny_qwen2_arch_64_dir, data, out) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "model.safetensors").read_text() == "previous"
    assert quantize(tiny_gptq_dir, data, tmp_path / "q2") == 2
    assert "already quantized" in capsys.readouterr().err
    assert quantize(tiny_qwen2_arch_64_dir, data, tmp_path / "q3", "--group-size", "48") == 2
    assert "does not divide" in capsys.readouterr().err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert quantize(adapter, data, tmp_path / "q5") == 2
    assert "merge it first" in capsys.readouterr().err
    one = write_json(tmp_path / "one.json", SAMPLES[:1])
    assert quantize(tiny_qwen2_arch_64_dir, one, tmp_path / "q4") == 2
    assert "at least 2 samples" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("q2", "q3", "q4"))


@pytest.mark.parametrize("output_flag", ["--output_dir", "--out_path"])
def test_the_output_flag_and_its_old_spelling_are_one_flag(output_flag):
    args = run_gptq.parse_args(["--model_name_or_path", "m", "--data_path", "d.json", output_flag, "out"])
    assert (args.model_name_or_path, args.data_path, args.output_dir) == ("m", "d.json", "out")


def test_bad_flags_are_listed_at_once_before_loading(tiny_qwen2_arch_64_dir, data, tmp_path, capsys):
    import struct

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<I", 3))
    capsys.readouterr()
    assert quantize(truncated, data, tmp_path / "q", "--group-size", "0", "--num_samples", "0", "--damp_percent",
                    "1", "--num_eval_samples", "0", "--batch_size", "0") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --model_name_or_path {truncated}: the file ends inside its header (truncated, or not completely "
        "written): export or download it again",
        "error: --num_samples 0: must be at least 1.",
        "error: --num_eval_samples 0: must be at least 1.",
        "error: --batch_size 0: must be at least 1.",
        "error: --damp_percent 1.0: must be above 0 and below 1.",
        "error: --group-size 0: use a positive number of columns, or -1.",
    ]
    assert not (tmp_path / "q").exists()
    model = unloadable_copy(tiny_qwen2_arch_64_dir, tmp_path)
    assert quantize(model, data, tmp_path / "q", "--max_len", "0") == 2
    assert capsys.readouterr().err == "error: --max_len 0: must be at least 1.\n"

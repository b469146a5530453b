"""bench/ on a tiny model: the throughput, memory and profile tools run, compare like with like, write their
reports, and patch nothing. (What they measure on the real model is quoted in README, not asserted here.)"""

import ast
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from bench import harness, models, qwen_published
from chatft.errors import ModelPathError
from support import CONVERSATIONS, ROOT, write_json

# alpaca records, read by chatft's own alpaca reader; every third has two earlier exchanges (`history`)
ALPACA = [{"instruction": f"Question {i}?", "input": "Some context." if i % 2 else "", "output": f"Answer {i}.",
           "history": [["Hi", "Hello!"], ["How are you?", "Fine, thanks."]] if i % 3 == 0 else []} for i in range(12)]


def run_module(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, env=env)


def tiny_shape(**changes) -> dict:
    """Qwen2.5-0.5B's shape cut to 2 layers of width 64 (its vocabulary kept): bench.models' code path in seconds."""
    return {**models.SHAPES["qwen2.5-0.5b"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, **changes}


def cache_with_tiny_model_named(name: str, cache) -> dict:
    """An environment whose chatft cache holds a tiny model under bench.models' `name`, as materialize left it: the
    tools resolve `-m name` to it through their real code path, without building the full-size model."""
    models.materialize(name, {name: tiny_shape()}, root=cache / "bench-models")
    return {**os.environ, "CHATFT_CACHE": str(cache)}


@pytest.mark.slow
def test_throughput_compares_the_same_tokens(tiny_qwen2_arch_64_dir, tmp_path):
    data = write_json(tmp_path / "train.json", ALPACA)
    variants = ["chatft", "chatft_packing", "chatft_padded", "seed"] + (["trl"] if importlib.util.find_spec("trl") else [])
    result = run_module("bench.throughput", "-m", str(tiny_qwen2_arch_64_dir), "--data", str(data), "--num_samples", "12",
                        "--max_length", "64", "--batch_size", "2", "--modes", "lora", "--precisions", "fp32",
                        "--variants", ",".join(variants), "--repeats", "1", "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r["variant"]: r for r in json.load(open(tmp_path / "bench.json"))["results"]}
    assert set(runs) == set(variants) and not any("error" in r for r in runs.values())
    # every variant, TRL's included, trained on the same real tokens (all turns of every conversation) with the loss
    # on the same ones; they differ only in the padding around them
    assert len({runs[name]["real_tokens"] for name in runs}) == 1
    assert len({runs[name]["labelled_tokens"] for name in runs}) == 1
    assert runs["chatft"]["padded_fraction"] == runs["chatft_packing"]["padded_fraction"] == 0
    assert runs["seed"]["positions"] == 12 * 64  # every sample padded to --max_length
    assert runs["chatft"]["padded_fraction"] < runs["chatft_padded"]["padded_fraction"] < runs["seed"]["padded_fraction"]
    assert all(r["tokens_per_second"] > 0 and r["mfu"] > 0 for r in runs.values())
    # MFU counts the same work for every variant (TRL's LoRA included), so its ratios are the speed ratios
    assert len({(r["flops_per_token"], r["flops_per_labelled_token"]) for r in runs.values()}) == 1
    assert "| lora | fp32 | seed |" in result.stdout


def test_trl_messages_keep_every_turn(qwen3_tokenizer):
    from bench.throughput import trl_chat_template, trl_messages
    from chatft.data.chat_format import DEFAULT_SYSTEM_MESSAGE, render_chatml, to_conversation
    from chatft.data.formats import from_alpaca

    sample, problems = from_alpaca(ALPACA[0], "train.json, sample 0")
    assert not problems
    messages = trl_messages(sample)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[-1] == {"role": "assistant", "content": "Answer 0."}
    # TRL's template renders the messages as the toolkit renders the sample, and marks its trained spans
    text, spans = render_chatml(to_conversation(sample), DEFAULT_SYSTEM_MESSAGE)
    rendered = qwen3_tokenizer.apply_chat_template(messages, chat_template=trl_chat_template(DEFAULT_SYSTEM_MESSAGE),
                                                  tokenize=False)
    assert rendered == text
    marked = qwen3_tokenizer.apply_chat_template(messages, chat_template=trl_chat_template(DEFAULT_SYSTEM_MESSAGE),
                                                return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(marked["input_ids"], marked["assistant_masks"]) if m]
    assert qwen3_tokenizer.decode(trained) == "".join(text[a:b] for a, b in spans)


def test_preprocessing_benchmark(tiny_qwen2_arch_64_dir, tmp_path):
    data = write_json(tmp_path / "train.json", CONVERSATIONS * 5)
    result = run_module("bench.throughput", "-m", str(tiny_qwen2_arch_64_dir), "--data", str(data), "--preprocess_only",
                        "--num_samples", "0", "--repeats", "1", "--json", str(tmp_path / "pre.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "pre.json"))
    assert report["num_conversations"] == len(CONVERSATIONS) * 5
    assert set(report["seconds"]) == {"chatft", "chatft_2_workers", "chatft_cached", "seed_per_turn",
                                      "batched_call_floor"}
    assert "| seed_per_turn |" in result.stdout


@pytest.mark.slow
def test_memory_benchmark(tiny_qwen2_arch_64_dir, tmp_path):
    result = run_module("bench.memory", "-m", str(tiny_qwen2_arch_64_dir), "--modes", "full,lora", "--seq-len", "32",
                        "--batch-size", "2", "--steps", "1", "--json", str(tmp_path / "memory.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    full, lora = json.load(open(tmp_path / "memory.json"))
    assert (full["mode"], lora["mode"]) == ("full", "lora")
    assert 0 < lora["trainable_params"] < full["trainable_params"]
    assert all(r["peak_mib"] > 0 and r["tokens_per_s"] > 0 for r in (full, lora))


@pytest.mark.slow
def test_gguf_types_benchmark(tiny_llama_256_dir, tmp_path):
    """Each type's file size and reply perplexity, through transformers and (installed in CI) llama.cpp, against f16."""
    result = run_module("bench.gguf_types", "-m", str(tiny_llama_256_dir), "--types", "f16", "q4_k_m",
                        "--num_samples", "4", "--json", str(tmp_path / "types.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    source, f16, q4_k_m = json.load(open(tmp_path / "types.json"))
    assert (source["type"], f16["type"], q4_k_m["type"]) == ("source (float32)", "f16", "q4_k_m")
    assert q4_k_m["size_mb"] < 0.5 * f16["size_mb"]
    # a random model's perplexity is about its vocabulary's size; float16 rounding barely moves it
    assert f16["ppl_transformers"] == pytest.approx(source["ppl_transformers"], rel=1e-3)
    if importlib.util.find_spec("llama_cpp"):
        assert f16["ppl_llama_cpp"] == pytest.approx(f16["ppl_transformers"], rel=1e-3)
    table = result.stdout.splitlines()
    assert any(line.startswith("type ") and "ppl (llama.cpp)" in line for line in table), result.stdout
    assert [line.split()[0] for line in table[-2:]] == ["f16", "q4_k_m"], result.stdout


@pytest.mark.slow
def test_profile_table(tmp_path):
    # -m names a bench.models shape with a published counterpart (a tiny stand-in in the cache: the real 1.8B would
    # take minutes); the launcher runs from anywhere, relative paths resolving against the caller's directory
    env = cache_with_tiny_model_named("qwen-1.8b", tmp_path / "cache")
    result = subprocess.run(["bash", str(ROOT / "finetune" / "profile.sh"), "-m", "qwen-1.8b", "-o", "profile",
                             "--modes", "lora,full", "--lengths", "256", "--steps", "2",
                             "--gradient_accumulation_steps", "2"], cwd=tmp_path, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "profile"
    cells = json.load(open(output / "profile.json"))
    assert [(c["mode"], c["length"], c["status"]) for c in cells] == [
        (mode, 256, "ok") for mode in ("lora", "full")]
    assert {c["model"] for c in cells} == {str(tmp_path / "cache" / "bench-models" / "qwen-1.8b")}
    assert all(c["seconds_per_iteration"] > 0 and c["peak_memory_mib"] > 0 for c in cells)
    table = (output / "profile.md").read_text()
    assert "| mode | 256 |" in table and "activation checkpointing True" in table
    assert table.count(" s/it [Qwen: ") == 2 and "s/it [Qwen: 6.7G / 1.0s/it] |" in table  # Qwen-1.8B LoRA at 256
    assert "A100-80G" in table and qwen_published.SOURCE in table
    assert (output / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_module("bench.profile_table", "-m", "qwen-1.8b", "-o", str(output), env=env)
    assert again.returncode == 2 and "not empty" in again.stderr  # an earlier profile is not overwritten


def test_profile_table_puts_qwens_number_beside_ours():
    from bench.profile_table import markdown_table

    results = [{"mode": "lora", "length": 256, "status": "ok", "peak_memory_mib": 2048.0, "seconds_per_iteration": 3.0},
               {"mode": "lora", "length": 300, "status": "OOM"}]
    table = markdown_table(results, ["lora"], [256, 300], "header", shape="qwen-7b")
    assert "| lora | 2.00 GiB, 3.00 s/it [Qwen: 20.1G / 1.2s/it] | OOM |" in table  # Qwen measured no 300
    assert "Qwen's published Qwen-7B (A100-80G" in table.splitlines()[0]
    for shape in (None, "qwen2.5-0.5b"):  # no published counterpart: our numbers alone
        assert "Qwen" not in markdown_table(results, ["lora"], [256, 300], "header", shape=shape)
    assert qwen_published.published("qwen-7b", "full", 2048) is None  # Qwen's full-parameter 7B row stops at 1024
    assert qwen_published.published("qwen-1.8b", "qlora", 8192) == "15.8G / 6.5s/it"


# Published sizes, from each model card: Qwen2.5-0.5B 0.49B, Qwen2.5-1.5B 1.54B, Qwen2.5-7B 7.61B parameters
@pytest.mark.parametrize("name, published", [("qwen2.5-0.5b", 0.49e9), ("qwen2.5-1.5b", 1.54e9), ("qwen2.5-7b", 7.61e9)])
def test_shapes_have_the_published_sizes(name, published):
    assert abs(models.parameter_count(name) / published - 1) < 0.01


@pytest.mark.parametrize("name, hidden, intermediate, layers", [("qwen-1.8b", 2048, 11008, 24), ("qwen-7b", 4096, 22016, 32)])
def test_qwen1_shapes_have_qwen1s_parameters(name, hidden, intermediate, layers):
    """Counted module by module as Qwen-1's modeling_qwen.py builds them from its config.json: c_attn (fused QKV,
    biased), c_proj (unbiased), w1, w2 and the MLP's c_proj at intermediate_size // 2, ln_1, ln_2, ln_f, and an
    untied lm_head; vocabulary 151936."""
    vocab, width = 151936, intermediate // 2
    layer = (3 * hidden * hidden + 3 * hidden) + hidden * hidden + 3 * hidden * width + 2 * hidden
    assert models.parameter_count(name) == 2 * vocab * hidden + layers * layer + hidden


def test_materialize_writes_a_loadable_model_once_and_atomically(tmp_path):
    import torch
    import transformers

    from chatft.errors import ArgumentError

    shapes = {"tiny": tiny_shape(), "broken": tiny_shape(hidden_act="no_such_activation")}
    path = models.materialize("tiny", shapes, root=tmp_path)
    assert path == tmp_path / "tiny" and sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temp dir left
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2 and model.config.vocab_size == 151936
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>" and model.config.eos_token_id == tokenizer.eos_token_id
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                                    add_generation_prompt=True)
    written = (path / "model.safetensors").stat().st_mtime_ns
    assert models.materialize("tiny", shapes, root=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written  # built once, then read from the cache
    # a write that fails halfway leaves nothing that looks like a model
    with pytest.raises(KeyError, match="no_such_activation"):
        models.materialize("broken", shapes, root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    with pytest.raises(ArgumentError, match="'qwen-3b' is not a benchmark model shape; choose from tiny, broken"):
        models.materialize("qwen-3b", shapes, root=tmp_path)


def test_resolve_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    shapes = {"tiny": tiny_shape()}
    assert models.resolve_model("tiny", shapes) == str(tmp_path / "cache" / "bench-models" / "tiny")
    shutil.copytree(tmp_path / "cache" / "bench-models" / "tiny", tmp_path / "local")
    assert models.resolve_model("local", shapes) == str(tmp_path / "local")  # workers run elsewhere: absolute
    # what holds no model is refused before any measurement, as finetune.py refuses it (hub ids: from the local cache)
    (tmp_path / "empty").mkdir()
    for missing, problem in ((str(tmp_path / "nowhere"), "no such file or directory"), ("empty", "no config.json"),
                             ("Qwen/Qwen2.5-0.5B-not-cached", "not in the local hub cache")):
        with pytest.raises(ModelPathError, match=f"^-m .*{problem}.*\n  -m also takes a benchmark shape: tiny$"):
            models.resolve_model(missing, shapes)
    assert models.shape_name("qwen-7b") == "qwen-7b" and models.shape_name("Qwen/Qwen-7B") is None


@pytest.mark.parametrize("tool", ["bench.throughput", "bench.memory", "bench.profile_table", "bench.gguf_types"])
def test_every_tool_takes_a_shape_name(tool, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # no shape name wrapped at its hyphen
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(tool).main(["--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and all(name in out for name in models.SHAPES), out


def test_throughput_resolves_a_shape_name(tmp_path):
    env = cache_with_tiny_model_named("qwen2.5-0.5b", tmp_path / "cache")
    data = write_json(tmp_path / "train.json", CONVERSATIONS)
    result = run_module("bench.throughput", "-m", "qwen2.5-0.5b", "--data", str(data), "--preprocess_only",
                        "--num_samples", "0", "--repeats", "1", "--preprocessing_num_workers", "1", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| seed_per_turn |" in result.stdout


def test_worker_that_reports_nothing_is_a_failure():
    run = harness.run_worker("bench.no_such_tool", {"x": 1})
    assert run.result is None and run.failure == "exit 1" and "No module named bench.no_such_tool" in run.stderr


def test_resident_memory_names_say_what_they_return():
    # In a fresh process: in this one, memory freed by earlier tests stays resident and a new block may reuse it
    check = """
from bench import harness
before = harness.current_resident_mib()
block = b"\\x01" * (64 * 2**20)  # 64 MiB, every page written
assert harness.current_resident_mib() > before + 48, "current_resident_mib missed a 64 MiB block"
del block
assert harness.current_resident_mib() < before + 16, "current_resident_mib still counts a freed 64 MiB block"
assert harness.peak_resident_mib() >= before + 48, "peak_resident_mib forgot the block"
assert harness.peak_above_mib(False, before) >= 48
"""
    parent_block = b"\x02" * (256 * 2**20)  # a worker's peak is its own, not its (large) parent's
    check += "assert harness.peak_resident_mib() < before + 160, \"peak_resident_mib counted the parent's memory\"\n"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    del parent_block
    assert result.returncode == 0, result.stderr[-2000:]


def test_bench_patches_nothing():
    """The tools reach the toolkit through its doors (finetune.train's hooks), never by assigning to a module."""
    modules = {"finetune", "transformers", "trl", "chatft"}
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                while isinstance(target, ast.Attribute):
                    target = target.value
                    assert not (isinstance(target, ast.Name) and target.id in modules), \
                        f"{path.name}:{node.lineno} assigns to an attribute of {target.id}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                assert not (isinstance(node.args[0], ast.Name) and node.args[0].id in modules), \
                    f"{path.name}:{node.lineno} setattr on {node.args[0].id}"


@pytest.mark.parametrize("mode", ["full", "lora", "lora_emb"])
def test_matmul_flops_count_each_linear_layer_as_it_trains(mode):
    """MFU's numerator: 2 FLOPs per weight forward, 2 backward to the input, 2 more where the weight trains; LoRA's
    A and B are layers of their own; the output layer's cost is per labelled token (the trained copy under peft)."""
    import peft
    import transformers

    from bench.throughput import matmul_flops

    hidden, inter, kv, vocab, rank = 32, 48, 16, 100, 4
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    projections = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
                   "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                   "down_proj": (inter, hidden)}
    base = 2 * sum(i * o for i, o in projections.values())  # both layers
    if mode == "full":
        expected = {"flops_per_token": 6 * base, "flops_per_labelled_token": 6 * hidden * vocab}
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=rank, target_modules=list(projections), modules_to_save=["lm_head"] if mode == "lora_emb" else None))
        adapters = 2 * sum(rank * (i + o) for i, o in projections.values())
        expected = {"flops_per_token": 4 * base + 6 * adapters,
                    "flops_per_labelled_token": (6 if mode == "lora_emb" else 4) * hidden * vocab}
    assert matmul_flops(model) == expected


def test_repeated_runs_are_summarized_as_median_and_spread(capsys):
    from bench.throughput import print_table, summarize

    def run(variant, tokens_per_second, repeat, **extra):
        return {"mode": "lora", "precision": "bf16", "variant": variant, "repeat": repeat, "padded_fraction": 0.0,
                "tokens_per_second": tokens_per_second, "mfu": tokens_per_second / 1000, "train_runtime": 1.0,
                "peak_memory_mib": 1000.0 + tokens_per_second, "peak_above_baseline_mib": tokens_per_second, **extra}

    runs = [run("chatft", 300, 0), run("seed", 100, 0), run("chatft", 200, 1), run("seed", 150, 1),
            run("chatft", 400, 2), run("seed", 50, 2), run("trl", 10, 0), run("trl", 0, 1, error="killed")]
    results = {r["variant"]: r for r in summarize(runs)}
    assert results["chatft"]["tokens_per_second"] == 300 and results["seed"]["tokens_per_second"] == 100
    assert (results["chatft"]["tokens_per_second_min"], results["chatft"]["tokens_per_second_max"]) == (200, 400)
    assert results["chatft"]["runs"] == 3 and "repeat" not in results["chatft"]
    assert results["trl"]["error"] == "killed"  # one failed run fails the variant: no median of what is left
    print_table(list(results.values()))
    table = capsys.readouterr().out
    assert "| lora | bf16 | chatft | 300.0 (200.0-400.0) |" in table
    assert "| lora | bf16 | seed | 100.0 (50.0-150.0) |" in table and "| 3.00x | 3.00 |" in table  # ratios of medians
    assert "| lora | bf16 | trl | failed: killed" in table


TINY_MOE = ["--hidden", "64", "--layers", "1", "--experts", "4", "--top_k", "2", "--expert_width", "32", "--heads", "4",
            "--kv_heads", "2", "--head_dim", "16"]


def test_moe_shapes_have_equal_active_parameters_but_the_router(tmp_path):
    """bench.moe's two shapes: a token passes through as many weights in each, the MoE router aside; the routed
    experts count at top_k / experts of their size, everything else whole."""
    from bench.moe import parameter_counts, shapes

    named = shapes(64, 2, 4, 2, 32, 4, 2, 16)
    moe, dense = (parameter_counts(str(models.materialize(name, named, root=tmp_path))) for name in named)
    router = 2 * 4 * 64  # 2 layers of a 4 x 64 router
    experts = 2 * 4 * 3 * 64 * 32  # 2 layers of 4 experts: gate, up and down, 64 x 32 each
    assert moe["active_parameters"] - dense["active_parameters"] == router
    assert moe["total_parameters"] - moe["active_parameters"] == experts // 2  # top 2 of 4
    assert dense["total_parameters"] == dense["active_parameters"]
    assert moe["embedding_parameters"] == dense["embedding_parameters"] == 2 * 151936 * 64  # untied


@pytest.mark.slow
def test_moe_benchmark_reports_every_number(tmp_path):
    variants = "moe:chatft,dense:chatft" + (",moe:trl" if importlib.util.find_spec("trl") else "")
    data = write_json(tmp_path / "train.json", ALPACA[:4])
    result = run_module("bench.moe", *TINY_MOE, "--data", str(data), "--num_samples", "4", "--max_length", "64",
                        "--batch_size", "2", "--variants", variants, "--json", str(tmp_path / "moe.json"),
                        env={**os.environ, "CHATFT_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "moe.json"))
    rows = {(r["model"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {tuple(v.split(":")) for v in variants.split(",")} and not any("error" in r for r in rows.values())
    assert len({r["real_tokens"] for r in rows.values()}) == 1  # the same tokens for every model and trainer
    for row in rows.values():
        assert row["tokens_per_second"] > 0 and row["tokens_per_second_per_billion_active"] > 0
        assert row["peak_above_baseline_mib"] > 0 and 0 < row["active_parameters"] <= row["total_parameters"]
    assert rows["moe", "chatft"]["active_parameters"] < rows["moe", "chatft"]["total_parameters"]
    assert all(rows[kind, "chatft"]["estimated_memory_mib"] > 0 for kind in ("moe", "dense"))
    assert report["experts_implementation"] in ("grouped_mm", "eager", "batched_mm")
    targets = report["targets"]
    assert {"moe_vs_dense_per_active_parameter", "moe_memory_estimate_error", "dense_memory_estimate_error"} <= set(targets)
    assert all(t["value"] > 0 for name, t in targets.items() if not name.endswith("error"))
    assert "| moe | chatft |" in result.stdout and "target moe_vs_dense_per_active_parameter:" in result.stdout
    assert "experts implementation" in result.stdout
    if "moe:trl" in variants:
        assert "chatft_vs_trl_best" in targets and "| moe | trl |" in result.stdout


def test_dpo_pairs_give_chatft_and_trl_the_same_tokens(qwen3_tokenizer, tmp_path):
    """bench.dpo's pairs: the same prompt and reply tokens through chatft's preference reader and through TRL's
    chat template (what DPOTrainer tokenizes), so both trainers count the same real tokens; a long-prompt set's
    prompts reach their length."""
    from bench.dpo import build_pairs
    from bench.throughput import trl_chat_template
    from chatft.data.chat_format import DEFAULT_SYSTEM_MESSAGE
    from chatft.data.datasets import load_samples
    from chatft.data.preference import load_preference_samples, tokenize_pairs

    samples = load_samples(str(ROOT / "data" / "identity_demo.json"))
    template = trl_chat_template(DEFAULT_SYSTEM_MESSAGE, newline_after_last_reply=False)

    def trl_ids(messages, **kwargs):
        return qwen3_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                                   **kwargs)["input_ids"]

    for prompt_tokens in (0, 96):
        pairs = build_pairs(samples, 4, prompt_tokens, qwen3_tokenizer)
        assert [p["rejected"] for p in pairs[:-1]] == [p["chosen"] for p in pairs[1:]]  # the next pair's answer
        assert all(len(trl_ids(p["prompt"], add_generation_prompt=True)) >= prompt_tokens for p in pairs)
        # the ordinary set: the question alone; the long set: earlier exchanges before it
        assert {len(p["prompt"]) > 1 for p in pairs} == {prompt_tokens > 0}
        chatft = tokenize_pairs(load_preference_samples(str(write_json(tmp_path / "pairs.json", pairs)), "dpo"),
                                qwen3_tokenizer, 4096)
        for pair, tokens in zip(pairs, chatft):
            prompt = trl_ids(pair["prompt"], add_generation_prompt=True)
            assert tokens.prompt_ids == prompt
            assert prompt + tokens.chosen_ids == trl_ids(pair["prompt"] + pair["chosen"])
            assert prompt + tokens.rejected_ids == trl_ids(pair["prompt"] + pair["rejected"])


def test_dpo_plan_and_targets(capsys):
    """TRL runs on the ordinary and the first long-prompt set only; the further sets measure the shared prompt's
    saving (chatft against chatft_unshared); the targets are ratios of medians."""
    from bench.dpo import plan, print_report, summarize

    assert plan(["chatft", "chatft_unshared", "trl"], ["ordinary", "long128", "long512"]) == [
        ("ordinary", "chatft"), ("ordinary", "chatft_unshared"), ("ordinary", "trl"), ("long128", "chatft"),
        ("long128", "chatft_unshared"), ("long128", "trl"), ("long512", "chatft"), ("long512", "chatft_unshared")]

    def run(pair_set, variant, seconds, memory, repeat):
        return {"precision": "fp32", "pair_set": pair_set, "variant": variant, "repeat": repeat, "real_tokens": 600,
                "positions": 600, "padding": 0, "train_runtime": seconds, "tokens_per_second": 600 / seconds,
                "peak_memory_mib": 1000 + memory, "peak_above_baseline_mib": memory}

    runs = [run("long128", variant, seconds * (1 + repeat), memory, repeat) for repeat in range(3)
            for variant, seconds, memory in (("chatft", 1, 500), ("chatft_unshared", 1.5, 600), ("trl", 4, 1000))]
    target, = summarize(runs)["targets"]
    assert target["vs_trl_best"] == pytest.approx(4) and target["memory_vs_trl"] == pytest.approx(0.5)
    assert target["shared_prompt_saving"] == pytest.approx(1.5) and target["speed_target"] == 3
    print_report(summarize(runs), {"long128": 140.0})
    out = capsys.readouterr().out
    assert "| fp32 | long128 (prompt 140) | trl | 75.0 (50.0-150.0) |" in out and "| 4.00x | 0.50 |" in out
    assert "fp32 long128: 4.00x TRL's best (trl; target >= 3x: met); memory 0.50x TRL's (target <= 0.6: met); " \
           "shared prompt 1.50x faster than unshared" in out


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("trl"), reason="the DPO rows compare against TRL's DPOTrainer")
def test_throughput_dpo_rows(tiny_qwen2_arch_64_dir, tmp_path):
    """`--stage dpo` at its smallest: every planned row measured, the same pair tokens for chatft and TRL, the
    shared prompt computing fewer positions than the unshared one."""
    result = run_module("bench.throughput", "--stage", "dpo", "-m", str(tiny_qwen2_arch_64_dir), "--num_samples", "2",
                        "--batch_size", "2", "--long_prompts", "64", "--precisions", "fp32",
                        "--variants", "chatft,chatft_unshared,trl", "--repeats", "1", "--json", str(tmp_path / "dpo.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "dpo.json"))
    rows = {(r["pair_set"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {(s, v) for s in ("ordinary", "long64") for v in ("chatft", "chatft_unshared", "trl")}
    assert not any("error" in r for r in rows.values())
    assert all(math.isfinite(r["tokens_per_second"]) and r["tokens_per_second"] > 0 and r["peak_above_baseline_mib"] > 0
               for r in rows.values())
    for pair_set in ("ordinary", "long64"):
        same = [r for (s, _), r in rows.items() if s == pair_set]
        assert len({(r["pairs"], r["real_tokens"], r["labelled_tokens"]) for r in same}) == 1
        assert rows[pair_set, "chatft"]["positions"] == rows[pair_set, "chatft"]["real_tokens"] + 2  # one per pair
        assert rows[pair_set, "chatft"]["positions"] < rows[pair_set, "chatft_unshared"]["positions"]
    assert report["prompt_lengths"]["long64"] >= 64
    assert "| fp32 | long64 (prompt " in result.stdout and "| trl |" in result.stdout
    assert "fp32 long64: " in result.stdout and "shared prompt " in result.stdout

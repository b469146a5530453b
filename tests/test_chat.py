"""cli_demo.py and chatft.serve.chat on tiny models: every kind of checkpoint is detected and served (a .gguf file by
llama.cpp, or by transformers where llama-cpp-python is not installed), one-shot queries are deterministic, the
interactive loop keeps and clears its history, prompts use the saved template."""

import subprocess
import sys

import pytest
import torch

import cli_demo
from chatft.serve import chat
from chatft.serve.chat import checkpoint_kind, load_chat_model
from chatft.data.chat_format import stop_token_ids
from chatft.errors import ModelPathError
from support import ROOT, require_llama_cpp, run


def test_every_kind_of_checkpoint_is_detected_and_served(tiny_qwen2_arch_64_dir, tiny_gptq_dir, data_file, tmp_path):
    run(tiny_qwen2_arch_64_dir, data_file, tmp_path / "lora", "--use_lora", "--lora_r", "4")
    run(tiny_qwen2_arch_64_dir, data_file, tmp_path / "qlora", "--use_lora", "--q_lora", "--lora_r", "4", "--bf16", "True")
    expected = {tiny_qwen2_arch_64_dir: ("full", "Qwen2ForCausalLM"), tiny_gptq_dir: ("gptq", "Qwen2ForCausalLM"),
                tmp_path / "lora": ("lora", "PeftModelForCausalLM"), tmp_path / "qlora": ("qlora", "PeftModelForCausalLM")}
    for path, (kind, class_name) in expected.items():
        assert checkpoint_kind(str(path)) == kind
        model, tokenizer, loaded_kind = load_chat_model(str(path))
        assert loaded_kind == kind and type(model).__name__ == class_name
        messages = [{"role": "user", "content": "hi"}]
        reply = chat.generate_reply(model, tokenizer, messages, max_new_tokens=4)
        # served = the loaded model answers the template's prompt: its reply opens with the model's own greedy token
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"].to(model.device)
        with torch.no_grad():
            first = int(model(input_ids=prompt).logits[0, -1].argmax())
        if first in stop_token_ids(tokenizer):
            assert reply == ""
        else:
            assert reply.startswith(tokenizer.decode([first], skip_special_tokens=True).strip()), (kind, reply)
            assert 0 < len(tokenizer(reply, add_special_tokens=False).input_ids) <= 5  # at most 4 new tokens
    qlora, _, _ = load_chat_model(str(tmp_path / "qlora"))
    q_proj = qlora.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit"  # served on the NF4 base it was trained on
    with pytest.raises(ModelPathError, match="missing: no such file or directory"):
        load_chat_model(str(tmp_path / "missing"))


def test_a_gguf_file_is_served_by_llama_cpp_else_by_transformers(tiny_llama_256_dir, tmp_path, monkeypatch, capsys):
    import export_gguf

    require_llama_cpp()
    monkeypatch.setenv("CHATFT_CACHE", str(tmp_path / "cache"))  # where transformers' copy of the file is written
    path = str(tmp_path / "model.gguf")
    assert export_gguf.main(["--model_path", str(tiny_llama_256_dir), "--output", path]) == 0
    assert checkpoint_kind(path) == "gguf"
    query = ["-c", path, "--query", "Who are you?", "--query", "你好", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert cli_demo.main(query) == 0
    in_llama_cpp = capsys.readouterr()
    assert "(GGUF file, f16, in llama.cpp on " in in_llama_cpp.err
    monkeypatch.setattr(chat, "llama_cpp_installed", lambda: False)
    assert cli_demo.main(query) == 0
    in_transformers = capsys.readouterr()
    assert "(GGUF file, torch.float32, cpu)" in in_transformers.err
    # the same greedy replies: the same float16 weights, llama.cpp rounding its activations to match
    assert in_llama_cpp.out == in_transformers.out and in_llama_cpp.out.startswith("User: Who are you?\nAssistant: ")
    monkeypatch.undo()

    sampled = ["-c", path, "--query", "Hi", "--do-sample", "--temperature", "1.5", "--max-new-tokens", "8"]
    replies = []
    for seed in ("1", "1", "2"):
        assert cli_demo.main(sampled + ["--seed", seed]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] != replies[2]  # llama.cpp's sampler, seeded by --seed
    lines = iter(["hello", ":history", ":exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli_demo.main(["-c", path, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("Assistant: ") == 2  # streamed, then shown by :history


def test_query_mode_is_greedy_and_deterministic(tiny_qwen2_arch_64_dir):
    command = [sys.executable, "cli_demo.py", "-c", str(tiny_qwen2_arch_64_dir), "--max-new-tokens", "8",
               "--query", "Who are you?", "--query", "你好"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    assert first.stdout == second.stdout
    assert first.stdout.startswith("User: Who are you?\nAssistant: ") and "\nUser: 你好\nAssistant: " in first.stdout
    assert "full model" in first.stderr


def test_prompts_use_the_saved_template_and_system(tiny_qwen2_arch_64_dir, monkeypatch, capsys):
    prompts = []
    original = chat.generate_reply

    def recording(model, tokenizer, messages, *args, **kwargs):
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        return original(model, tokenizer, messages, *args, **kwargs)

    monkeypatch.setattr(chat, "generate_reply", recording)
    assert cli_demo.main(["-c", str(tiny_qwen2_arch_64_dir), "--query", "Q1", "--system", "Be brief.",
                          "--max-new-tokens", "2"]) == 0
    assert prompts == ["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n"]


def test_interactive_history_clear_and_exit(tiny_qwen2_arch_64_dir, monkeypatch, capsys):
    seen = []

    def fake_reply(model, tokenizer, messages, *args, **kwargs):
        seen.append([m["content"] for m in messages])
        return f"reply {len(seen)}"

    monkeypatch.setattr(chat, "generate_reply", fake_reply)
    lines = iter(["first", "second", ":history", ":clear", "third", ":exit", "never"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli_demo.main(["-c", str(tiny_qwen2_arch_64_dir)]) == 0
    assert seen == [["first"], ["first", "reply 1", "second"], ["third"]]
    out = capsys.readouterr().out
    assert "User: first\nAssistant: reply 1\nUser: second\nAssistant: reply 2" in out


def test_interactive_streams_to_the_terminal(tiny_qwen2_arch_64_dir):
    result = subprocess.run([sys.executable, "cli_demo.py", "-c", str(tiny_qwen2_arch_64_dir), "--max-new-tokens", "4"],
                            cwd=ROOT, input="hello\n:history\n", capture_output=True, text=True, check=True)
    assert "Commands: :clear, :history, :exit" in result.stdout and "User: hello\nAssistant: " in result.stdout
    # once streamed as it was generated, once more by :history
    assert result.stdout.count("Assistant: ") == 2, result.stdout


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert cli_demo.main(["-c", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: --model_name_or_path {tmp_path / 'nope'}: no such file or directory\n"


def test_generate_reply_stops_at_im_end(tiny_qwen2_arch_64_dir):
    model, tokenizer, _ = load_chat_model(str(tiny_qwen2_arch_64_dir))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(tokenizer)

    calls = []

    def im_end_always_wins(module, inputs, logits):
        calls.append(1)
        logits = logits.clone()
        logits[..., im_end] = 1e4
        return logits

    model.lm_head.register_forward_hook(im_end_always_wins)
    reply = chat.generate_reply(model, tokenizer, [{"role": "user", "content": "hi"}], max_new_tokens=20)
    assert reply == "" and len(calls) == 1  # one forward pass: generation stopped at the first <|im_end|>


def test_tools_are_offered_as_in_training(tiny_qwen2_arch_64_dir, data_file, tmp_path, monkeypatch, capsys):
    import json

    from chatft.data.chat_format import Conversation, Turn, parse_tools, render_qwen3

    definitions = [{"name": "get_weather", "description": "Weather in a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(definitions))
    prompts = []
    original = chat.generate_reply

    def recording(model, tokenizer, messages, *args, **kwargs):
        prompts.append(tokenizer.apply_chat_template(messages, tools=kwargs.get("tools"), add_generation_prompt=True,
                                                     tokenize=False))
        return original(model, tokenizer, messages, *args, **kwargs)

    monkeypatch.setattr(chat, "generate_reply", recording)
    lines = iter(["Weather in Paris?", ":tool 12°C", ":exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    trained_model = tmp_path / "out"  # a fine-tuned model: its tokenizer carries the training run's chat template
    run(tiny_qwen2_arch_64_dir, data_file, trained_model)
    assert cli_demo.main(["-c", str(trained_model), "--tools", str(tools_file), "--max-new-tokens", "2"]) == 0
    # the tiny model has the Qwen3 tokenizer, so it trained in the qwen3 format (chat_format auto)
    trained, _ = render_qwen3(Conversation((Turn("user", "Weather in Paris?"),), parse_tools(definitions)))
    assert prompts[0] == trained + "<|im_start|>assistant\n"  # exactly the training rendering, tools included
    assert prompts[1].endswith("<|im_start|>user\n<tool_response>\n12°C\n</tool_response><|im_end|>\n"
                               "<|im_start|>assistant\n")
    tools_file.write_text('{"name": "not a list"}')
    assert cli_demo.main(["-c", str(trained_model), "--tools", str(tools_file)]) == 2
    assert "expected a list of tool definitions" in capsys.readouterr().err


def test_a_replys_thinking_is_shown_apart_from_its_answer_or_hidden(tiny_qwen2_arch_64_dir, monkeypatch, capsys):
    monkeypatch.setattr(chat, "generate_reply", lambda *a, **k: "<think>\nIt is a greeting.\n</think>\n\nHello!")
    assert cli_demo.main(["-c", str(tiny_qwen2_arch_64_dir), "--query", "Hi"]) == 0
    assert "User: Hi\nThinking: It is a greeting.\nAssistant: Hello!\n" in capsys.readouterr().out
    assert cli_demo.main(["-c", str(tiny_qwen2_arch_64_dir), "--query", "Hi", "--hide-thinking"]) == 0
    out = capsys.readouterr().out
    assert "User: Hi\nAssistant: Hello!\n" in out and "greeting" not in out


@pytest.mark.parametrize("show", [True, False])
def test_the_streamer_puts_thinking_on_its_own_line(tiny_qwen2_arch_64_dir, capsys, show):
    from chatft.serve.chat import ThinkingStreamer

    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_qwen2_arch_64_dir)
    streamer = ThinkingStreamer(tokenizer, show_thinking=show)
    for chunk, end in [("<think>\nLet me", False), (" see.\n</th", False), ("ink>\n\nHel", False), ("lo!", True),
                       ("No thoughts", True)]:
        streamer.on_finalized_text(chunk, stream_end=end)
    out = capsys.readouterr().out
    expected = ("Thinking: Let me see.\n" if show else "") + "Assistant: Hello!\nAssistant: No thoughts\n"
    assert out == expected


@pytest.mark.parametrize("model_flag", ["--model_name_or_path", "-c", "--checkpoint-path", "--checkpoint_path"])
def test_the_model_flag_and_its_old_spellings_are_one_flag(model_flag):
    args = cli_demo.parse_args([model_flag, "out", "--max_new_tokens", "7", "--top_p", "0.5", "--do_sample",
                                "--hide_thinking", "--cpu_only", "--trust_remote_code"])
    assert (args.model_name_or_path, args.max_new_tokens, args.top_p) == ("out", 7, 0.5)
    assert args.do_sample and args.hide_thinking and args.cpu_only and args.trust_remote_code
    hyphenated = cli_demo.parse_args([model_flag, "out", "--max-new-tokens", "7", "--top-p", "0.5", "--do-sample",
                                      "--hide-thinking", "--cpu-only", "--trust-remote-code"])
    assert hyphenated == args


# Bad inputs: one `error:` line each, all at once, exit 2, before any model loads (unloadable_copy's weights cannot)


def test_a_truncated_gguf_file_is_one_line_with_or_without_llama_cpp(tmp_path, monkeypatch, capsys):
    import struct

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<I", 3))  # the magic and the version, nothing more
    expected = (f"error: --model_name_or_path {truncated}: the file ends inside its header (truncated, or not "
                "completely written): export or download it again\n")
    capsys.readouterr()
    assert cli_demo.main(["-c", str(truncated), "--query", "hi"]) == 2
    assert capsys.readouterr().err == expected
    monkeypatch.setattr(chat, "llama_cpp_installed", lambda: False)  # transformers' GGUF loader would take it
    assert cli_demo.main(["-c", str(truncated), "--query", "hi"]) == 2
    assert capsys.readouterr().err == expected
    no_architecture = tmp_path / "no-architecture.gguf"
    no_architecture.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))  # a whole header, no metadata
    assert cli_demo.main(["-c", str(no_architecture)]) == 2
    assert capsys.readouterr().err == (f"error: --model_name_or_path {no_architecture}: no general.architecture in its "
                                       "metadata, so no model can be read from it: export or download it again\n")


def test_every_bad_flag_is_listed_at_once_before_loading(tiny_qwen2_arch_dir, tmp_path, capsys):
    from support import unloadable_copy

    model = unloadable_copy(tiny_qwen2_arch_dir, tmp_path)
    tools = tmp_path / "tools.json"
    tools.write_text('[\n  {"name": "get_weather",}\n]')
    capsys.readouterr()
    assert cli_demo.main(["-c", str(model), "--max-new-tokens", "0", "--top-p", "1.5", "--seed", "-1", "--do-sample",
                          "--temperature", "0", "--tools", str(tools)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --max-new-tokens 0: must be at least 1.",
        "error: --top-p 1.5: must be above 0 and at most 1.",
        "error: --seed -1: must be at least 0 and at most 4294967295.",
        "error: --temperature 0.0: must be above 0.",
        f"error: --tools {tools}: not valid JSON (line 2, column 26: Expecting property name enclosed in double quotes).",
    ]
    assert cli_demo.main(["-c", str(model), "--temperature", "0", "--tools", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err == f"error: --tools {tmp_path / 'none.json'}: no such file.\n"  # greedy: no temperature

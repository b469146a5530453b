"""Data loading and validation (every problem reported with file, index, id), datasets and the collator."""

import dataclasses
import json
import logging
import random

import pytest
import torch
import transformers

from chatft.data.chat_format import IGNORE_INDEX, to_conversation, to_turns, tokenize_conversation
from chatft.data.datasets import (
    ChatCollator, DataError, LazySupervisedDataset, PackedDataset, PaddingFreeCollator, SupervisedDataset,
    first_fit_decreasing, load_samples, make_datasets, split_off_eval, tokenize_training_samples,
)
import chatft.data.datasets
from support import (alpaca_to_conversations, assert_close_up_to_rounding, decoder_terms, shared_data, shared_data_path,
                     write_json)

GOOD = {"id": "ok", "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]}


def read(records: list[dict]) -> list:
    """The conversations that records in the seed's format hold, read by chat_format.to_conversation (Qwen's samples,
    unchecked): what load_samples must give for them."""
    return [to_conversation(record) for record in records]


def test_json_and_jsonl_load(tmp_path):
    as_json = write_json(tmp_path / "a.json", [GOOD, GOOD])
    as_jsonl = tmp_path / "a.jsonl"
    as_jsonl.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n")
    assert load_samples(str(as_json)) == load_samples(str(as_jsonl)) == read([GOOD, GOOD])
    jsonl_named_json = tmp_path / "b.json"
    jsonl_named_json.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD))
    assert load_samples(str(jsonl_named_json)) == read([GOOD, GOOD])
    [sample] = load_samples(str(write_json(tmp_path / "c.json", [GOOD])))
    assert sample.id == "ok" and [(t.role, t.content) for t in sample.turns] == [("user", "Hi"), ("assistant", "Hello")]


BAD_SAMPLES = [
    ({"id": 7}, "sample 0 (id=7): missing 'conversations'"),
    ({"conversations": "hi"}, "sample 0: 'conversations' must be a non-empty list"),
    ({"id": "a", "conversations": [{"value": "x"}, {"from": "assistant", "value": "y"}]},
     "sample 0 (id='a'): conversations[0]: missing 'from'"),
    ({"id": "b", "conversations": [{"from": "user"}, {"from": "assistant", "value": "y"}]},
     "conversations[0]: missing 'value'"),
    ({"id": "c", "conversations": [{"from": "bot", "value": "x"}, {"from": "assistant", "value": "y"}]},
     "conversations[0]: unknown role 'bot' in 'from'"),
    ({"id": "c2", "conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]},  # ShareGPT
     "conversations[1]: unknown role 'robot' in 'from' (expected one of human, gpt, system"),
    ({"id": "c3", "conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{}"}]},
     "conversations[1]: a tool call must be an object with a 'name' and 'arguments'"),
    ({"id": "t1", "conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{name: f}"}]},
     "conversations[1]: a tool call must be JSON"),
    ({"id": "t2", "conversations": [{"from": "human", "value": "x"},
                                    {"from": "function_call", "value": '{"name": "f", "arguments": [1]}'}]},
     "conversations[1]: tool call 'f': 'arguments' must be an object, found a list"),
    ({"id": "t3", "conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": '{"name": "f"}'}]},
     "conversations[1]: tool call 'f' has no 'arguments'"),
    ({"id": "t4", "conversations": [{"from": "human", "value": "x"},  # a call never answered
                                    {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                                    {"from": "gpt", "value": "y"}]},
     "conversations[1]: tool call out of order: it must be followed by its result (a tool result turn), found a "
     "assistant turn"),
    ({"id": "t5", "conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": "42"},
                                    {"from": "gpt", "value": "y"}]},
     "conversations[1]: tool result out of order: it must follow a tool call (or another result), found after a "
     "user turn"),
    ({"id": "t6", "conversations": [{"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                                    {"from": "observation", "value": "42"}, {"from": "gpt", "value": "y"}]},
     "sample 0 (id='t6'): the conversation opens with a tool call and its result"),
    ({"id": "t7", "tools": '[{"name": "f"', "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "sample 0 (id='t7'): 'tools': not valid JSON"),
    ({"id": "t8", "tools": [{"description": "no name"}], "conversations": [
        {"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "sample 0 (id='t8'): 'tools': tool 0 is not a definition with a 'name'"),
    ({"id": "t9", "system": "s", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": " "}]},
     "conversations[1]: empty assistant 'value'"),  # named in the record, not shifted by the system turn
    ({"id": "m4", "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"},
                               {"role": "assistant", "content": "y"}]},
     "messages[1]: tool result out of order"),
    ({"id": "m5", "messages": [{"role": "user", "content": "x"},
                               {"role": "assistant", "content": "Let me look.", "tool_calls": [
                                   {"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                               {"role": "user", "content": "z"}, {"role": "assistant", "content": "y"}]},
     "messages[1]: tool call out of order"),  # its text and its call are one message, named once
    ({"id": "m6", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "not json"}}]}]},
     "messages[1]: 'tool_calls': tool call 'f': 'arguments' text is not a JSON object"),
    ({"id": "m", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ["y"]}]},
     "messages[1]: 'content' must be a string, found a list"),
    ({"id": "m2", "messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]},
     "messages[0]: empty user 'content'"),
    ({"id": "m3", "messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
     "messages[1]: unknown role 'bot' (expected system, user, assistant, tool)"),
    ({"instruction": "x", "output": 3}, "sample 0: 'output' must be a string, found a int"),
    ({"instruction": "x", "output": " "}, "sample 0: 'output' is empty"),
    ({"instruction": "x", "output": "y", "history": [["q"]]}, "'history' must be a list of [query, reply] string pairs"),
    ({"id": "d", "conversations": [{"from": "user", "value": 3}, {"from": "assistant", "value": "y"}]},
     "conversations[0]: 'value' must be a string, found a int"),
    ({"id": "e", "conversations": [{"from": "user", "value": "x"}, {"from": "assistant", "value": "  "}]},
     "conversations[1]: empty assistant 'value'"),
    ({"id": "f", "conversations": [{"from": "user", "value": ""}, {"from": "assistant", "value": "y"}]},
     "conversations[0]: empty user 'value'"),
    ({"id": "g", "conversations": [{"from": "system", "value": "s"}, {"from": "user", "value": "x"}]},
     "sample 0 (id='g'): no assistant turn"),
    ({"id": "h", "conversations": [{"from": "assistant", "value": "only a leading reply"}, {"from": "user", "value": "x"}]},
     "sample 0 (id='h'): no assistant turn"),
    (["not", "an", "object"], "sample 0: expected an object with 'conversations', found a list"),
]


@pytest.mark.parametrize("sample,message", BAD_SAMPLES)
def test_each_bad_sample_is_named(tmp_path, sample, message):
    path = write_json(tmp_path / "bad.json", [sample])
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")) as error:
        load_samples(str(path))
    assert str(path) in str(error.value)


def test_empty_system_prompt_is_allowed(tmp_path):
    sample = {"id": "s", "conversations": [{"from": "system", "value": ""}, *GOOD["conversations"]]}
    assert load_samples(str(write_json(tmp_path / "d.json", [sample]))) == read([sample])


def test_all_problems_reported_up_to_a_cap(tmp_path):
    samples = [GOOD] + [{"id": i, "conversations": [{"from": "bot", "value": "x"}]} for i in range(1, 40)]
    with pytest.raises(DataError) as error:
        load_samples(str(write_json(tmp_path / "many.json", samples)))
    message = str(error.value)
    assert "sample 1 (id=1)" in message and "sample 20 (id=20)" in message and "sample 39" not in message
    assert "39 problem(s)" in message and "... and 19 more problems" in message


@pytest.mark.parametrize("content,message", [
    ("{not json", "invalid JSON at line 1"),
    ('{"conversations": []}', "expected a JSON list of samples, found a dict"),
    ("[]", "contains no samples"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_samples(str(path))


def test_utf8_bom_is_accepted_and_non_utf8_is_reported(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert load_samples(str(path)) == read([GOOD])
    path.write_bytes(json.dumps([GOOD]).encode("utf-16"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_samples(str(path))


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        load_samples(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_samples(str(tmp_path / "nope.json"))


def test_collator_pads_to_multiple_of_8():
    batch = ChatCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": list(range(1, 11)), "labels": list(range(1, 11))},
    ])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [0] * 13
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 6, 7] + [IGNORE_INDEX] * 13
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 10]
    assert batch["attention_mask"].dtype == torch.long


def long_sample(i):
    return {"id": f"long{i}", "conversations": [{"from": "user", "value": "word " * 200}, {"from": "assistant", "value": "ok"}]}


DROPPED_LONG1 = ("Dropped 1 of 3 samples with no assistant token within model_max_length=64 (truncation cut every "
                 "reply: raise --model_max_length to keep them): sample 1 (id='long1')")


def test_eager_dataset_drops_untrainable_samples(qwen3_tokenizer, caplog):
    data = [GOOD, long_sample(1), GOOD]
    dataset = SupervisedDataset(data, qwen3_tokenizer, max_len=64)
    assert len(dataset) == 2
    assert "Dropped 1 of 3" in caplog.text and "id='long1'" in caplog.text
    assert [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()] == [DROPPED_LONG1]


def test_lazy_dataset_never_yields_a_sample_without_loss(qwen3_tokenizer, caplog):
    """--lazy_preprocess holds the very samples the eager dataset keeps, dropped with the same message: an epoch is
    the same samples either way (no untrainable sample replaced by its neighbour, which trained that one twice)."""
    data = [GOOD, long_sample(1), {**GOOD, "id": "third"}]
    dataset = LazySupervisedDataset(data, qwen3_tokenizer, max_len=64)
    assert [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()] == [DROPPED_LONG1]
    caplog.clear()
    eager = SupervisedDataset(data, qwen3_tokenizer, max_len=64)
    assert [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()] == [DROPPED_LONG1]
    assert len(dataset) == len(eager) == 2
    assert [dataset[i] for i in range(2)] == [eager[i] for i in range(2)]
    assert all(any(label != IGNORE_INDEX for label in dataset[i]["labels"]) for i in range(2))


def test_lazy_dataset_tokenizes_up_front_only_the_samples_truncation_may_empty(qwen3_tokenizer, monkeypatch):
    """Its byte bound on the tokens before the first reply clears the short samples without tokenizing them; the
    long ones are tokenized, once, and kept for their first access."""
    data = many_samples(6) + [long_sample(1)]
    dataset = LazySupervisedDataset(data, qwen3_tokenizer, max_len=512)
    assert sorted(dataset.cache) == [6]  # "word " * 200 before the reply: 1,000 bytes, more than 512
    assert len(dataset) == 7 and dataset[6] == SupervisedDataset(data, qwen3_tokenizer, 512)[6]
    calls = []
    real = chatft.data.datasets.tokenize_conversation
    monkeypatch.setattr(chatft.data.datasets, "tokenize_conversation", lambda *a, **k: calls.append(1) or real(*a, **k))
    dataset[6]
    assert calls == []


def test_nothing_trainable_is_an_error(qwen3_tokenizer):
    with pytest.raises(DataError, match="raise it"):
        SupervisedDataset([long_sample(1)], qwen3_tokenizer, max_len=64)
    with pytest.raises(DataError, match="raise it"):
        LazySupervisedDataset([long_sample(1)], qwen3_tokenizer, max_len=64)[0]


def test_make_datasets(qwen3_tokenizer):
    expected = tokenize_conversation(to_turns(GOOD["conversations"]), qwen3_tokenizer, 128, "s")
    expected = {"input_ids": expected.input_ids, "labels": expected.labels}
    assert qwen3_tokenizer.decode([t for t, label in zip(expected["input_ids"], expected["labels"])
                                  if label != IGNORE_INDEX]) == "Hello<|im_end|>"
    train, evaluation = make_datasets([GOOD] * 3, None, qwen3_tokenizer, 128, lazy=True, system_message="s")
    assert isinstance(train, LazySupervisedDataset) and evaluation is None
    assert len(train) == 3 and [train[i] for i in range(3)] == [expected] * 3
    train, evaluation = make_datasets([GOOD] * 3, [GOOD], qwen3_tokenizer, 128, lazy=False, system_message="s")
    assert isinstance(train, SupervisedDataset) and isinstance(evaluation, SupervisedDataset)
    assert [train[i] for i in range(len(train))] == [expected] * 3 and [evaluation[0]] == [expected]
    assert train.num_tokens == 3 * len(expected["input_ids"])
    train, _ = make_datasets([GOOD] * 3, None, qwen3_tokenizer, 128, lazy=False, system_message="s", packing=True)
    assert isinstance(train, PackedDataset) and len(train) == 1 and train.num_samples == 3
    assert train[0]["input_ids"] == expected["input_ids"] * 3


# --- formats --------------------------------------------------------------------------------------------

SAME_CONVERSATION = {
    "conversations": [{"id": "s1", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"},
        {"from": "user", "value": "What is 2+2?\nAnswer."}, {"from": "assistant", "value": "4"}]}],
    "sharegpt": [{"id": "s1", "system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "What is 2+2?\nAnswer."}, {"from": "gpt", "value": "4"}]}],
    "messages": [{"id": "s1", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 2+2?\nAnswer."},
        {"role": "assistant", "content": "4"}]}],
    "alpaca": [{"id": "s1", "system": "Be brief.", "history": [["Hi", "Hello"]], "instruction": "What is 2+2?",
                "input": "Answer.", "output": "4"}],
}


@pytest.mark.parametrize("data_format", SAME_CONVERSATION)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_every_format_gives_the_same_sample(tmp_path, data_format, suffix, qwen3_tokenizer):
    path = tmp_path / f"data{suffix}"
    records = SAME_CONVERSATION[data_format]
    path.write_text(json.dumps(records) if suffix == ".json" else "\n".join(json.dumps(r) for r in records))
    assert load_samples(str(path)) == read(SAME_CONVERSATION["conversations"])  # detected
    assert load_samples(str(path), data_format) == read(SAME_CONVERSATION["conversations"])  # named


def test_public_alpaca_and_sharegpt_files_load(tmp_path):
    alpaca = load_samples(str(shared_data_path("alpaca_en_demo.json")))
    expected = alpaca_to_conversations(shared_data("alpaca_en_demo.json"))
    assert [s.turns for s in alpaca] == [s.turns for s in read(expected)]
    glaive = load_samples(str(shared_data_path("glaive_toolcall_en_demo.json")))  # ShareGPT with tool calls
    records = shared_data("glaive_toolcall_en_demo.json")
    assert len(glaive) == len(records)
    for sample, record in zip(glaive, records):
        roles = {"human": "user", "gpt": "assistant"}
        seed = {"tools": record["tools"], "conversations": [{"from": roles.get(t["from"], t["from"]), "value": t["value"]}
                                                            for t in record["conversations"]]}
        assert (sample.turns, sample.tools) == (to_conversation(seed).turns, to_conversation(seed).tools)
        assert sample.tools == tuple(json.dumps({"type": "function", "function": tool}, ensure_ascii=False)
                                     for tool in json.loads(record["tools"] or "[]"))


TOOL_TOOLS = [{"name": "get_weather", "description": "Weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
SAME_TOOL_CONVERSATION = {  # text before a call, two parallel calls, their two results, a non-ASCII answer
    "conversations": [{"id": "w", "tools": TOOL_TOOLS, "conversations": [
        {"from": "user", "value": "Weather in Paris and Zürich?"},
        {"from": "assistant", "value": "Checking both."},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                       {"name": "get_weather", "arguments": {"city": "Zürich"}}])},
        {"from": "observation", "value": "12°C"}, {"from": "observation", "value": "8°C"},
        {"from": "assistant", "value": "Paris 12°C, Zürich 8°C."}]}],
    "sharegpt": [{"id": "w", "tools": json.dumps(TOOL_TOOLS), "conversations": [
        {"from": "human", "value": "Weather in Paris and Zürich?"},
        {"from": "gpt", "value": "Checking both."},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                       {"name": "get_weather", "arguments": {"city": "Zürich"}}],
                                                      ensure_ascii=False)},
        {"from": "observation", "value": "12°C"}, {"from": "observation", "value": "8°C"},
        {"from": "gpt", "value": "Paris 12°C, Zürich 8°C."}]}],
    "messages": [{"id": "w", "tools": [{"type": "function", "function": tool} for tool in TOOL_TOOLS], "messages": [
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12°C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "8°C"},
        {"role": "assistant", "content": "Paris 12°C, Zürich 8°C."}]}],
}


SAME_TOOL_CONVERSATION["messages (legacy roles)"] = [{  # LLaMA-Factory's tags / OpenAI's legacy function calling
    "id": "w", "tools": json.dumps(TOOL_TOOLS), "messages": [
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {"role": "assistant", "content": "Checking both."},
        {"role": "function_call", "content": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                         {"name": "get_weather", "arguments": '{"city": "Zürich"}'}])},
        {"role": "observation", "content": "12°C"}, {"role": "function", "content": "8°C"},
        {"role": "assistant", "content": "Paris 12°C, Zürich 8°C."}]}]


@pytest.mark.parametrize("data_format", SAME_TOOL_CONVERSATION)
def test_tool_calls_give_the_same_tokens_in_every_format(tmp_path, data_format, qwen3_tokenizer):
    from chatft.data.chat_format import render_chatml, to_conversation

    path = write_json(tmp_path / "tools.json", SAME_TOOL_CONVERSATION[data_format])
    expected = to_conversation(SAME_TOOL_CONVERSATION["conversations"][0])
    [sample] = load_samples(str(path))
    assert to_conversation(sample) == expected
    assert [t.role for t in expected.turns] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c.arguments for c in expected.turns[1].tool_calls] == ['{"city": "Paris"}', '{"city": "Zürich"}']
    tokens = tokenize_training_samples([sample], qwen3_tokenizer, 4096)
    assert tokens == tokenize_training_samples(read(SAME_TOOL_CONVERSATION["conversations"]), qwen3_tokenizer, 4096)
    text, _ = render_chatml(expected)
    assert tokens[0].input_ids == qwen3_tokenizer(text, add_special_tokens=False).input_ids


def test_several_files_and_directories(tmp_path):
    directory = tmp_path / "dir"
    directory.mkdir()
    write_json(directory / "a.json", SAME_CONVERSATION["alpaca"])
    write_json(directory / "b.json", SAME_CONVERSATION["messages"])
    (directory / "notes.txt").write_text("ignored")
    single = write_json(tmp_path / "c.json", [GOOD])
    expected = read(SAME_CONVERSATION["conversations"] * 2 + [GOOD])
    assert load_samples(f"{directory},{single}") == expected
    with pytest.raises(DataError, match="nope.json: no such data file"):
        load_samples(f"{single},{tmp_path / 'nope.json'}")


def test_eval_fraction_is_a_seeded_disjoint_split():
    samples = [{**GOOD, "id": i} for i in range(40)]
    train, evaluation = split_off_eval(samples, 0.1, seed=3)
    assert len(evaluation) == 4 and len(train) == 36 and sorted(s["id"] for s in train + evaluation) == list(range(40))
    assert split_off_eval(samples, 0.1, seed=3) == (train, evaluation)
    assert split_off_eval(samples, 0.1, seed=4)[1] != evaluation
    assert len(split_off_eval(samples[:3], 0.01, seed=0)[1]) == 1  # at least one
    with pytest.raises(DataError, match="too few"):
        split_off_eval(samples[:1], 0.5, seed=0)


# --- tokenizing: batches, workers, the on-disk cache ------------------------------------------------------

def many_samples(n):
    return [{"id": i, "conversations": [{"from": "user", "value": f"Question {i}: " + "why? " * (i % 7)},
                                        {"from": "assistant", "value": f"Answer {i}." + " Because." * (i % 5)}]}
            for i in range(n)]


def test_workers_give_the_same_samples_in_order(qwen3_tokenizer, monkeypatch):
    monkeypatch.setattr(chatft.data.datasets, "TOKENIZE_BATCH", 7)  # several batches per worker
    data = many_samples(40)
    alone = tokenize_training_samples(data, qwen3_tokenizer, 32, "s")
    assert tokenize_training_samples(data, qwen3_tokenizer, 32, "s", num_workers=2) == alone
    assert alone == [tokenize_conversation(to_turns(d["conversations"]), qwen3_tokenizer, 32, "s") for d in data]


def test_the_cache_is_reused_only_for_the_same_inputs(qwen3_tokenizer, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="chatft.data.datasets")
    data = many_samples(30) + [long_sample(1)]
    first = tokenize_training_samples(data, qwen3_tokenizer, 64, "s", cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".tokens"  # no scratch directory or progress file left behind

    calls = []
    real = chatft.data.datasets.tokenize_conversations
    monkeypatch.setattr(chatft.data.datasets, "tokenize_conversations", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert tokenize_training_samples(data, qwen3_tokenizer, 64, "s", cache_dir=tmp_path) == first
    assert calls == [] and "reusing 31 tokenized samples" in caplog.text
    dataset = SupervisedDataset(data, qwen3_tokenizer, 64, "s", cache_dir=tmp_path)
    assert len(dataset) == 30 and calls == []  # the untrainable long sample is still dropped

    changed = [{**data[0], "conversations": [data[0]["conversations"][0], {"from": "assistant", "value": "New."}]}]
    for other in [(changed + data[1:], 64, "s"), (data, 65, "s"), (data, 64, "t")]:  # data, length, template
        calls.clear()
        assert tokenize_training_samples(other[0], qwen3_tokenizer, other[1], other[2], cache_dir=tmp_path) == \
            tokenize_training_samples(other[0], qwen3_tokenizer, other[1], other[2])
        assert calls, other[1:]
    assert len(list(tmp_path.iterdir())) == 4


def test_an_unwritable_cache_only_warns(qwen3_tokenizer, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    samples = tokenize_training_samples(many_samples(3), qwen3_tokenizer, 64, "s", cache_dir=blocker / "cache")
    assert len(samples) == 3 and "Could not cache" in caplog.text


# --- packing ---------------------------------------------------------------------------------------------

def test_first_fit_decreasing_fills_bins_without_overflow():
    assert first_fit_decreasing([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(3000)]
    bins = first_fit_decreasing(lengths, 256)
    assert sorted(sum(bins, [])) == list(range(3000))
    assert all(sum(lengths[i] for i in members) <= 256 for members in bins)
    assert len(bins) <= 1.02 * sum(lengths) / 256 + 1  # nearly full rows
    with pytest.raises(ValueError):
        first_fit_decreasing([300], 256)


PACKING_SAMPLES = [
    {"id": "a", "conversations": [{"from": "user", "value": "Who are you?"}, {"from": "assistant", "value": "I am Tessa."}]},
    {"id": "b", "conversations": [{"from": "system", "value": "Be terse."}, {"from": "user", "value": "2+2?"},
                                  {"from": "assistant", "value": "4"}, {"from": "user", "value": "and 3+3?"},
                                  {"from": "assistant", "value": "6, obviously."}]},
    {"id": "c", "conversations": [{"from": "user", "value": "你好"}, {"from": "assistant", "value": " 你好！有什么可以帮你？"}]},
]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_packed_sample_gets_the_loss_and_gradients_it_gets_alone(tiny_qwen2_arch_dir, qwen3_tokenizer, attn_implementation):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_arch_dir, attn_implementation=attn_implementation)
    samples = SupervisedDataset(PACKING_SAMPLES, qwen3_tokenizer, 512)
    packed = PackedDataset(samples, 512)
    assert len(packed) == 1 and packed.rows[0]["position_ids"].count(0) == 3

    def summed_loss_and_grads(batch):
        model.zero_grad()
        # use_cache=False as in training: with a KV cache transformers ignores position_ids for masking
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        labels = batch["labels"]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                   reduction="none").view(labels.shape[0], -1)
        losses.sum().backward()
        return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    alone_losses, alone_grads = [], None
    for i in range(len(samples)):
        loss, grads = summed_loss_and_grads(ChatCollator(qwen3_tokenizer.pad_token_id, 1)([samples[i]]))
        alone_losses.append(loss[0, : len(samples[i]["input_ids"]) - 1])
        alone_grads = grads if alone_grads is None else {n: alone_grads[n] + g for n, g in grads.items()}
    packed_losses, packed_grads = summed_loss_and_grads(PaddingFreeCollator()([packed[0]]))
    start, terms = 0, decoder_terms(model.config, loss=True)  # the same sums, over other rows: equal up to rounding
    order = first_fit_decreasing([len(samples[i]["input_ids"]) for i in range(len(samples))], 512)[0]
    for i in order:  # per-token losses of each sample, at its place in the row
        n = len(samples[i]["input_ids"])
        assert_close_up_to_rounding(packed_losses[0, start : start + n - 1], alone_losses[i], terms=terms)
        if start > 0:  # the first token of a later sample is never predicted from the previous sample
            assert packed_losses[0, start - 1] == 0 and packed[0]["labels"][start] == IGNORE_INDEX
        start += n
    for name, grad in alone_grads.items():
        assert_close_up_to_rounding(packed_grads[name], grad, terms=terms)


def test_padding_free_collator_makes_one_row_of_samples_or_packed_rows():
    samples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    batch = PaddingFreeCollator()(samples)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: nothing is padding
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]] and batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # each sample's first label is never predicted (in a padded batch the shift drops it too)
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4], "position_ids": [0, 1, 0, 1]},
            {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]}]
    packed = PaddingFreeCollator()(rows)  # packed rows keep their samples' positions
    assert packed["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1]]
    assert packed["labels"].tolist() == [[-100, 2, -100, 4, -100, 6]]


def test_a_padding_free_batch_holds_the_samples_of_the_padded_batch(qwen3_tokenizer):
    samples = SupervisedDataset(PACKING_SAMPLES, qwen3_tokenizer, 512)
    features = [samples[i] for i in range(len(samples))]
    padded, flat = ChatCollator(qwen3_tokenizer.pad_token_id)(features), PaddingFreeCollator()(features)
    real = padded["attention_mask"].bool()
    assert torch.equal(flat["input_ids"][0], padded["input_ids"][real])
    # the same labelled positions after the shift: the loss sums and normalises over the same tokens
    assert int((flat["labels"][:, 1:] != IGNORE_INDEX).sum()) == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_openai_legacy_function_call_message(tmp_path):
    from chatft.data.chat_format import ToolCall, to_conversation

    path = write_json(tmp_path / "legacy.json", [{"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"a": 1}'}},
        {"role": "function", "name": "f", "content": "r"}, {"role": "assistant", "content": "y"}]}])
    [sample] = load_samples(str(path))
    turns = to_conversation(sample).turns
    assert [(t.role, t.content, t.tool_calls) for t in turns] == [
        ("user", "x", ()), ("assistant", "", (ToolCall("f", '{"a": 1}'),)), ("tool", "r", ()), ("assistant", "y", ())]


def test_mixed_formats_in_one_file(tmp_path):
    seed, sharegpt = SAME_CONVERSATION["conversations"][0], SAME_CONVERSATION["sharegpt"][0]
    # the seed's records and ShareGPT's mix: ShareGPT's reading covers both
    assert load_samples(str(write_json(tmp_path / "a.json", [seed, sharegpt]))) == read([seed, seed])
    mixed = write_json(tmp_path / "b.json", [SAME_CONVERSATION["messages"][0], SAME_CONVERSATION["alpaca"][0]])
    with pytest.raises(DataError, match=r"sample 1 \(id='s1'\): a record in alpaca format in a file detected as messages"):
        load_samples(str(mixed))


def test_glaive_as_openai_messages_gives_the_same_tokens(tmp_path, qwen3_tokenizer):
    """The public ShareGPT tool-call file, rewritten as OpenAI messages (tool_calls with JSON-text arguments, tool
    messages, wrapped tools) in JSONL: every sample tokenizes and labels exactly as the original."""
    as_messages = []
    for record in shared_data("glaive_toolcall_en_demo.json"):
        messages = []
        for turn in record["conversations"]:
            if turn["from"] == "function_call":
                call = json.loads(turn["value"])
                messages.append({"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                    "name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}]})
            else:
                role = {"human": "user", "gpt": "assistant", "observation": "tool"}[turn["from"]]
                messages.append({"role": role, "content": turn["value"]})
        tools = [{"type": "function", "function": tool} for tool in json.loads(record["tools"] or "[]")]
        as_messages.append({"messages": messages, **({"tools": tools} if tools else {})})
    path = tmp_path / "glaive_messages.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in as_messages), encoding="utf-8")
    original = tokenize_training_samples(load_samples(str(shared_data_path("glaive_toolcall_en_demo.json"))),
                                         qwen3_tokenizer, 4096)
    converted = tokenize_training_samples(load_samples(str(path)), qwen3_tokenizer, 4096)
    assert len(converted) == 300 and converted == original


def test_role_content_turns_under_conversations_and_raw_sharegpt_roles(tmp_path):
    messages = SAME_CONVERSATION["messages"][0]
    under_conversations = {"id": "s1", "conversations": messages["messages"]}
    assert load_samples(str(write_json(tmp_path / "a.json", [under_conversations]))) == read(SAME_CONVERSATION["conversations"])
    raw_sharegpt = [{"id": "r", "conversations": [{"from": "human", "value": "q"}, {"from": "chatgpt", "value": "a"},
                                                  {"from": "human", "value": "q2"}, {"from": "bing", "value": "b"}]}]
    [sample] = load_samples(str(write_json(tmp_path / "b.json", raw_sharegpt)))
    assert [(t.role, t.content) for t in sample.turns] == [("user", "q"), ("assistant", "a"), ("user", "q2"),
                                                           ("assistant", "b")]
    bad = [{"id": "x", "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}]
    with pytest.raises(DataError, match=r"sample 0 \(id='x'\): conversations\[1\]: 'content' must be a string"):
        load_samples(str(write_json(tmp_path / "c.json", bad)))


# --- reasoning traces and keys the reader does not use ------------------------------------------------------

TRACE = "Simple addition: 2+2=4.\n\nDouble-checked."
SAME_TRACE = {
    "messages": {"messages": [{"role": "user", "content": "What is 2+2?"},
                              {"role": "assistant", "reasoning_content": TRACE, "content": "4"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is 2+2?"},
                                   {"from": "gpt", "value": "4", "reasoning_content": TRACE}]},
    "conversations": {"conversations": [{"from": "user", "value": "What is 2+2?"},
                                        {"from": "assistant", "value": "4", "reasoning_content": TRACE}]},
    "inline": {"conversations": [{"from": "user", "value": "What is 2+2?"},
                                 {"from": "assistant", "value": f"<think>\n{TRACE}\n</think>\n\n4"}]},
}


@pytest.mark.parametrize("source", SAME_TRACE)
def test_a_reasoning_trace_is_read_and_trained(tmp_path, source, qwen3_tokenizer):
    """The issue's record: the trace is kept (not silently dropped) and trained with the answer."""
    [sample] = load_samples(str(write_json(tmp_path / "r.json", [SAME_TRACE[source]])))
    [tokenized] = SupervisedDataset([sample], qwen3_tokenizer, 512, "s").samples
    trained = qwen3_tokenizer.decode([t for t, label in zip(tokenized.input_ids, tokenized.labels) if label != IGNORE_INDEX])
    assert trained == f"<think>\n{TRACE}\n</think>\n\n4<|im_end|>"
    assert qwen3_tokenizer.decode(tokenized.input_ids).endswith(f"<|im_start|>assistant\n<think>\n{TRACE}\n</think>\n\n4<|im_end|>\n")


def test_a_reasoning_trace_of_the_wrong_kind_is_refused(tmp_path):
    records = [{"messages": [{"role": "user", "content": "q", "reasoning_content": "why"},
                             {"role": "assistant", "content": "a", "reasoning_content": 5}]}]
    with pytest.raises(DataError) as error:
        load_samples(str(write_json(tmp_path / "r.json", records)))
    assert "'reasoning_content' on a user turn" in str(error.value)
    assert "'reasoning_content' must be a string, found a int" in str(error.value)


def test_keys_the_reader_does_not_use_are_reported_once_per_file_with_counts(tmp_path, caplog):
    records = [{"id": "a", "source": "web", "messages": [
        {"role": "user", "content": "q", "name": "bob"},
        {"role": "assistant", "content": "a", "reasoning": "typo", "weight": 0.5}]},
        {"messages": [{"role": "user", "content": "q", "name": "eve"}, {"role": "assistant", "content": "a"}]}]
    load_samples(str(write_json(tmp_path / "r.json", records)))
    [line] = [r.getMessage() for r in caplog.records if "keys not read" in r.getMessage()]
    assert "'name' in 2 messages" in line and "'source' in 1 records" in line
    assert "'reasoning' in 1 messages: did you mean 'reasoning_content'?" in line
    assert "'weight'" not in line  # read since issue 26: a turn's loss weight (test_loss_weights_are_read_...)
    caplog.clear()
    load_samples(str(write_json(tmp_path / "clean.json", [SAME_TRACE["messages"]])))
    assert "keys not read" not in caplog.text


# --- per-turn loss weights (issue 26, C2) ------------------------------------------------------------------------

WEIGHTED = {"id": "w", "conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4", "weight": 2},
                                         {"from": "user", "value": "and 3+3?"},
                                         {"from": "assistant", "value": "6, obviously.", "weight": 0}]}


@pytest.mark.parametrize("record, weights", [
    (WEIGHTED, [2.0, 0.0]),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "loss": False},
                        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "b", "weight": 0.5}]}, [0.0, 0.5]),
    ({"messages": [{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a", "loss": True},
                   {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "loss": 3}]}, [1.0, 3.0]),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "let me look", "weight": 2,
                    "tool_calls": [{"name": "f", "arguments": {}}]},
                   {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "done"}]}, [2.0, 1.0]),
], ids=["conversations", "sharegpt", "messages", "messages-with-calls"])
def test_loss_weights_are_read_from_weight_or_loss_on_the_turns_of_every_format(tmp_path, caplog, record, weights):
    [sample] = load_samples(str(write_json(tmp_path / "w.json", [record])))
    assert [turn.weight for turn in sample.turns if turn.role == "assistant"] == weights
    assert all(turn.weight == 1 for turn in sample.turns if turn.role != "assistant")
    assert "keys not read" not in caplog.text  # read, so no longer reported as ignored


@pytest.mark.parametrize("turn, problem", [
    ({"from": "assistant", "value": "a", "weight": -1}, "conversations[1]: a loss weight ('weight' or 'loss') must be a "
                                                        "number >= 0 or true/false, found -1"),
    ({"from": "assistant", "value": "a", "weight": "high"}, "found 'high'"),
    ({"from": "assistant", "value": "a", "loss": float("inf")}, "found inf"),
    ({"from": "assistant", "value": "a", "weight": 0}, "every assistant turn has loss weight 0: nothing to learn"),
])
def test_bad_loss_weights_are_refused_naming_the_record_and_turn(tmp_path, turn, problem):
    record = {"id": "bad", "conversations": [{"from": "user", "value": "q"}, turn]}
    with pytest.raises(DataError, match="1 problem") as error:
        load_samples(str(write_json(tmp_path / "w.json", [GOOD, record])))
    assert "w.json: sample 1 (id='bad'): " in str(error.value) and problem in str(error.value)


def test_a_weight_on_a_turn_that_is_never_trained_is_refused_unless_0(tmp_path):
    record = {"id": "u", "conversations": [{"from": "user", "value": "q", "weight": 2}, {"from": "assistant", "value": "a"}]}
    with pytest.raises(DataError, match=r"sample 0 \(id='u'\): conversations\[0\]: loss weight 2 on a user turn: only "
                                        "assistant turns are trained"):
        load_samples(str(write_json(tmp_path / "w.json", [record])))
    record["conversations"][0]["weight"] = 0  # what it is anyway: accepted
    assert load_samples(str(write_json(tmp_path / "w.json", [record])))[0].turns[0].weight == 1


def test_weight_0_leaves_the_turn_untrained_and_weight_2_weighs_its_tokens(qwen3_tokenizer, tmp_path):
    [conversation] = load_samples(str(write_json(tmp_path / "w.json", [WEIGHTED])))
    sample = tokenize_conversation(conversation, qwen3_tokenizer, 512)
    # weight 0: exactly the labels of the conversation with that turn left untrained
    unweighted = tuple(dataclasses.replace(turn, weight=1.0) for turn in conversation.turns)
    untrained = tokenize_conversation(dataclasses.replace(conversation, turns=unweighted, trained=(1,)),
                                      qwen3_tokenizer, 512)
    assert untrained.weights is None
    assert sample.labels == untrained.labels and sample.input_ids == untrained.input_ids
    # weight 2 on the first reply's labelled tokens, 0 wherever nothing is labelled
    labelled = [label != IGNORE_INDEX for label in sample.labels]
    assert [w for w, on in zip(sample.weights, labelled) if on] == [2.0] * sum(labelled)
    assert all(w == 0 for w, on in zip(sample.weights, labelled) if not on)
    assert qwen3_tokenizer.decode([i for i, on in zip(sample.input_ids, labelled) if on]) == "4<|im_end|>"


def test_unweighted_data_keeps_its_batches_and_weights_all_1_are_unweighted(qwen3_tokenizer, tmp_path):
    ones = json.loads(json.dumps(WEIGHTED).replace('"weight": 2', '"weight": 1').replace('"weight": 0', '"loss": true'))
    dataset = SupervisedDataset(load_samples(str(write_json(tmp_path / "w.json", [ones, GOOD]))), qwen3_tokenizer, 512)
    assert not dataset.has_loss_weights and all(set(dataset[i]) == {"input_ids", "labels"} for i in range(2))
    for collator in (ChatCollator(qwen3_tokenizer.pad_token_id), PaddingFreeCollator()):
        assert "loss_weights" not in collator([dataset[0], dataset[1]])


def test_collators_carry_loss_weights_aligned_with_labels(qwen3_tokenizer, tmp_path):
    samples = load_samples(str(write_json(tmp_path / "w.json", [WEIGHTED, GOOD])))
    dataset = SupervisedDataset(samples, qwen3_tokenizer, 512)
    assert dataset.has_loss_weights and "loss_weights" in dataset[0] and "loss_weights" not in dataset[1]
    features = [dataset[0], dataset[1]]
    padded, flat = ChatCollator(qwen3_tokenizer.pad_token_id)(features), PaddingFreeCollator()(features)
    for batch in (padded, flat):
        assert batch["loss_weights"].dtype == torch.float32 and batch["loss_weights"].shape == batch["labels"].shape
        labelled = batch["labels"][:, 1:] != IGNORE_INDEX
        weights = batch["loss_weights"][:, 1:]
        assert weights[~labelled].eq(0).all()  # padding and unlabelled tokens weigh nothing
        # the weighted sample's reply at 2, the unweighted sample's at 1: the same weighted token count either way
        assert sorted(set(weights[labelled].tolist())) == [1.0, 2.0]
    real = padded["attention_mask"].bool()
    assert torch.equal(flat["loss_weights"][0, 1:], padded["loss_weights"][real][1:])
    assert float(flat["loss_weights"][:, 1:][flat["labels"][:, 1:] != IGNORE_INDEX].sum()) == float(
        padded["loss_weights"][:, 1:][padded["labels"][:, 1:] != IGNORE_INDEX].sum())
    packed = PackedDataset(dataset, 512)
    assert packed.has_loss_weights and len(packed[0]["loss_weights"]) == len(packed[0]["labels"])
    assert "loss_weights" in PaddingFreeCollator()([packed[0]])


def test_loss_weights_survive_the_cache_and_change_its_key(qwen3_tokenizer, tmp_path):
    samples = load_samples(str(write_json(tmp_path / "w.json", [WEIGHTED, GOOD])))
    first = tokenize_training_samples(samples, qwen3_tokenizer, 512, cache_dir=tmp_path / "cache")
    again = tokenize_training_samples(samples, qwen3_tokenizer, 512, cache_dir=tmp_path / "cache")
    assert again == first and first[0].weights is not None and again[1].weights is None
    reweighted = load_samples(str(write_json(tmp_path / "w2.json", [
        json.loads(json.dumps(WEIGHTED).replace('"weight": 2', '"weight": 3')), GOOD])))
    third = tokenize_training_samples(reweighted, qwen3_tokenizer, 512, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2 and 3.0 in third[0].weights
    unweighted = load_samples(str(write_json(tmp_path / "g.json", [GOOD])))
    tokenize_training_samples(unweighted, qwen3_tokenizer, 512, cache_dir=tmp_path / "cache2")
    [cached] = (tmp_path / "cache2").iterdir()
    arrays = json.loads((cached / "manifest.json").read_text())["arrays"]
    assert set(arrays) == {"input_ids", "labelled", "lengths", "origins", "trainable", "weighted"}  # no weights


def test_a_lazy_dataset_gives_the_same_weighted_samples(qwen3_tokenizer, tmp_path):
    samples = load_samples(str(write_json(tmp_path / "w.json", [WEIGHTED, GOOD])))
    eager, lazy = SupervisedDataset(samples, qwen3_tokenizer, 512), LazySupervisedDataset(samples, qwen3_tokenizer, 512)
    assert lazy.has_loss_weights and [lazy[i] for i in range(2)] == [eager[i] for i in range(2)]


def test_the_dry_run_shows_loss_weights_and_the_untrained_empty_think(tiny_qwen_arch_dir, tmp_path, capsys):
    """finetune.py --dry_run (the tokenizer only) on weighted data, with --ignore_empty_think in the qwen3 format."""
    import finetune
    from support import unloadable_copy

    model = unloadable_copy(tiny_qwen_arch_dir, tmp_path, keep_tokenizer=True)  # loading its weights would fail
    data = write_json(tmp_path / "w.json", [{"conversations": [{"from": "user", "value": "Name?"},
                                                               {"from": "assistant", "value": "Tessa.", "weight": 2}]}])
    common = ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
              "--dry_run", "True", "--use_cpu", "True", "--chat_format", "qwen3"]
    assert finetune.main(common) == 0
    report = capsys.readouterr().out
    assert "loss weights: 1 assistant turn(s) weighted other than 1 (0 at 0: context only)" in report
    assert "[[<think>\n\n</think>\n\nTessa.<|im_end|>]](weight 2)" in report
    assert finetune.main(common + ["--ignore_empty_think", "True"]) == 0
    assert "assistant\n<think>\n\n</think>\n\n[[Tessa.<|im_end|>]](weight 2)" in capsys.readouterr().out


def test_the_dry_run_counts_the_qwen3_turn_split(qwen3_tokenizer):
    """qwen3 format: a multi-turn conversation without reasoning is split, one sample per user query, and the dry
    run says so on its format line, with the tokens of context the extra samples repeat; --reasoning_turns last
    keeps one sample per conversation and says nothing."""
    from chatft.data.chat_format import training_conversations
    from chatft.train.report import dry_run_report

    multi = to_conversation({"id": "m", "conversations": [
        {"from": "user", "value": "Name?"}, {"from": "assistant", "value": "Tessa."},
        {"from": "user", "value": "Age?"}, {"from": "assistant", "value": "Two."}]})
    samples = [multi, to_conversation(GOOD)]
    first, second = training_conversations(multi, "qwen3")
    repeated = len(tokenize_conversation(first, qwen3_tokenizer, 1000, chat_format="qwen3").input_ids)
    common = dict(tokenizer=qwen3_tokenizer, max_len=256, system_message="s", packing=False, padding_free=True,
                  batch_size=2, accumulation=1, processes=1, seed=0, chat_format="qwen3")
    report = dry_run_report("training data", samples, **common)
    assert (f"qwen3 turns: 1 conversation(s) split into 2 samples, one per user query (and per tool step without "
            f"reasoning), so each reply is trained as Qwen3 generates it: 3 samples from 2, +{repeated:,} tokens of "
            "repeated context") in report
    assert "assistant\n[[<think>\n\n</think>\n\nTessa.<|im_end|>]]" in report  # the first sample: query 1's reply
    assert "qwen3 turns" not in dry_run_report("training data", samples, **common, reasoning_turns="last")


def test_the_cache_key_follows_the_rendering_rules(qwen3_tokenizer, tmp_path, monkeypatch):
    """The tokenized cache is keyed by the rendering code (chat_format.py's text) and by --reasoning_turns: a run
    after a change of how conversations are split or rendered never reads samples made by the old rules."""
    from chatft.data.datasets import chat_format_code, tokenized_cache_key

    samples = [to_conversation(GOOD)]
    key = lambda **rendering: tokenized_cache_key(samples, qwen3_tokenizer, 64, "s", "qwen3", **rendering)  # noqa: E731
    assert key() == key() != key(reasoning_turns="last")
    edited = tmp_path / "chat_format.py"
    edited.write_text(open(chat_format_code.__file__, encoding="utf-8").read() + "\n# a rule changed\n", encoding="utf-8")
    before = key()
    monkeypatch.setattr(chat_format_code, "__file__", str(edited))
    assert key() != before

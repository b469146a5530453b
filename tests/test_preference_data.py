"""chatft.data.preference: the preference shapes people publish read into pairs, the prompt rendered as SFT renders
it, only the reply and its <|im_end|> labelled."""

from __future__ import annotations

import pytest

from chatft.data.chat_format import IGNORE_INDEX, chatml_template, qwen3_template, tokenize_conversation
from chatft.data.preference import (KTOSample, PreferencePair, keep_trainable_pairs, read_kto_record,
                                    read_preference_record, tokenize_pairs)

SYSTEM = "You are Tessa."


def read(record, index=0):
    pair, problems = read_preference_record(record, index, "prefs.json")
    assert problems == [] and isinstance(pair, PreferencePair), problems
    return pair


def problems_of(record):
    pair, problems = read_preference_record(record, 3, "prefs.json")
    assert pair is None and len(problems) >= 1
    return problems


# one pair in every shape: each must read into the same pair
SHAPES = {
    "trl strings": {"prompt": "Who are you?", "chosen": "I am Tessa.", "rejected": "I am an AI."},
    "trl messages": {"prompt": [{"role": "user", "content": "Who are you?"}],
                     "chosen": [{"role": "assistant", "content": "I am Tessa."}],
                     "rejected": [{"role": "assistant", "content": "I am an AI."}]},
    "trl implicit prompt": {"chosen": [{"role": "user", "content": "Who are you?"},
                                       {"role": "assistant", "content": "I am Tessa."}],
                            "rejected": [{"role": "user", "content": "Who are you?"},
                                         {"role": "assistant", "content": "I am an AI."}]},
    "llama-factory sharegpt": {"conversations": [{"from": "human", "value": "Who are you?"}],
                               "chosen": {"from": "gpt", "value": "I am Tessa."},
                               "rejected": {"from": "gpt", "value": "I am an AI."}},
    "llama-factory messages": {"messages": [{"role": "user", "content": "Who are you?"}],
                               "chosen": {"role": "assistant", "content": "I am Tessa."},
                               "rejected": {"role": "assistant", "content": "I am an AI."}},
    "seed conversations": {"conversations": [{"from": "user", "value": "Who are you?"}],
                           "chosen": {"from": "assistant", "value": "I am Tessa."},
                           "rejected": {"from": "assistant", "value": "I am an AI."}},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_reads_into_the_same_pair(shape):
    pair = read(SHAPES[shape])
    assert [(t.role, t.content) for t in pair.prompt.turns] == [("user", "Who are you?")]
    assert (pair.chosen.role, pair.chosen.content) == ("assistant", "I am Tessa.")
    assert (pair.rejected.role, pair.rejected.content) == ("assistant", "I am an AI.")


def test_system_message_tools_and_multi_turn_prompt_are_kept():
    tools = [{"name": "weather", "description": "the weather", "parameters": {"type": "object", "properties": {}}}]
    pair = read({"system": SYSTEM, "tools": tools,
                 "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                   {"from": "human", "value": "Weather?"}],
                 "chosen": {"from": "function_call", "value": '{"name": "weather", "arguments": {}}'},
                 "rejected": {"from": "gpt", "value": "No idea."}})
    assert [t.role for t in pair.prompt.turns] == ["system", "user", "assistant", "user"]
    assert pair.prompt.tools and pair.chosen.tool_calls[0].name == "weather" and not pair.rejected.tool_calls


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "Q", "chosen": "Same.", "rejected": "Same."}, "'chosen' and 'rejected' are identical"),
    ({"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A"}],
      "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]},
     "the prompts of 'chosen' and 'rejected' differ"),
    ({"prompt": "Q", "chosen": "A"}, "missing 'rejected'"),
    ({"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "A"},
      "rejected": {"from": "human", "value": "B"}}, "'rejected' must end with an assistant reply"),
    ({"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "A"},
      "rejected": {"from": "robot", "value": "B"}}, "'rejected': unknown role 'robot'"),
    ({"chosen": "A", "rejected": "B"}, "add a 'prompt'"),
    ({"prompt": 3, "chosen": "A", "rejected": "B"}, "must be strings or lists of messages"),
])
def test_bad_pairs_are_named(record, expected):
    problems = problems_of(record)
    assert any(expected in p and "prefs.json: sample 3" in p for p in problems), problems


def test_kto_records_of_both_shapes():
    sample, problems = read_kto_record({"prompt": "Who are you?", "completion": "I am Tessa.", "label": True}, 0, "k")
    assert problems == [] and isinstance(sample, KTOSample) and sample.desirable
    assert (sample.completion.content, [t.content for t in sample.prompt.turns]) == ("I am Tessa.", ["Who are you?"])
    sample, problems = read_kto_record({"messages": [{"role": "user", "content": "Q"},
                                                     {"role": "assistant", "content": "A"}], "kto_tag": False}, 1, "k")
    assert problems == [] and not sample.desirable and sample.completion.content == "A"
    for label in ("yes", 1, None):
        sample, problems = read_kto_record({"prompt": "Q", "completion": "A", "label": label}, 2, "k")
        assert sample is None and "'label' must be true or false" in problems[0]


def labelled_text(ids, labels, tokenizer):
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_tokens_are_the_sft_rendering_and_only_the_reply_is_labelled(qwen3_tokenizer):
    pair = read({"system": SYSTEM, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"},
                                                     {"from": "human", "value": "Who are you?"}],
                 "chosen": {"from": "gpt", "value": "I am Tessa, made by Orbit Labs."},
                 "rejected": {"from": "gpt", "value": "I am a large language model."}})
    [tokens] = tokenize_pairs([pair], qwen3_tokenizer, 512)
    for reply, ids, labels in ((pair.chosen, tokens.chosen_ids, tokens.chosen_labels),
                               (pair.rejected, tokens.rejected_ids, tokens.rejected_labels)):
        messages = [{"role": t.role, "content": t.content} for t in pair.prompt.turns + (reply,)]
        whole = qwen3_tokenizer.apply_chat_template(messages, chat_template=chatml_template(), tokenize=True,
                                                    return_dict=False)
        assert tokens.prompt_ids + ids == list(whole)[: len(tokens.prompt_ids) + len(ids)]
        assert labelled_text(ids, labels, qwen3_tokenizer) == reply.content + "<|im_end|>"
    prompt = qwen3_tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.content} for t in pair.prompt.turns], chat_template=chatml_template(),
        add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokens.prompt_ids == list(prompt)  # the prompt ends where generation starts


def test_qwen3_format_prompt_is_the_templates_generation_prompt(qwen3_tokenizer):
    pair = read({"prompt": [{"role": "user", "content": "2+2?"}],
                 "chosen": [{"role": "assistant", "content": "4", "reasoning_content": "Add them."}],
                 "rejected": [{"role": "assistant", "content": "5"}]})
    [tokens] = tokenize_pairs([pair], qwen3_tokenizer, 512, chat_format="qwen3")
    prompt = qwen3_tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], chat_template=qwen3_template(),
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokens.prompt_ids == list(prompt)
    assert labelled_text(tokens.chosen_ids, tokens.chosen_labels, qwen3_tokenizer) == \
        "<think>\nAdd them.\n</think>\n\n4<|im_end|>"
    assert labelled_text(tokens.rejected_ids, tokens.rejected_labels, qwen3_tokenizer) == \
        "<think>\n\n</think>\n\n5<|im_end|>"
    # each side equals the SFT tokenization of the same conversation, up to the newline after the reply's <|im_end|>
    sft = tokenize_conversation(pair.prompt.__class__(pair.prompt.turns + (pair.chosen,)), qwen3_tokenizer, 512,
                                chat_format="qwen3")
    assert tokens.prompt_ids + tokens.chosen_ids == sft.input_ids[:-1]
    assert qwen3_tokenizer.decode(sft.input_ids[-1:]) == "\n"


def test_truncation_that_leaves_no_reply_token_drops_the_pair(qwen3_tokenizer):
    pairs = [read({"prompt": "Q " * 40, "chosen": "A", "rejected": "B"}),
             read({"prompt": "Q", "chosen": "A", "rejected": "B"}, index=1)]
    tokens = tokenize_pairs(pairs, qwen3_tokenizer, 30)
    kept, dropped = keep_trainable_pairs(tokens)
    assert [p.origin for p in kept] == [1] and dropped == [0]
    assert all(len(p.prompt_ids) + len(p.chosen_ids) <= 30 for p in tokens)


def write(path, records):
    import json

    path.write_text(json.dumps(records))
    return str(path)


def test_files_of_pairs_load_and_bad_files_are_named(tmp_path):
    from chatft.data.preference import load_preference_samples
    from chatft.errors import DataError

    pairs = write(tmp_path / "pairs.json", list(SHAPES.values()))
    loaded = load_preference_samples(pairs, "dpo")
    assert len(loaded) == len(SHAPES) and all(isinstance(p, PreferencePair) for p in loaded)
    # kto on pairs: each pair's chosen reply desirable, its rejected one not
    unpaired = load_preference_samples(pairs, "kto")
    assert [s.desirable for s in unpaired] == [True, False] * len(SHAPES)
    sft = write(tmp_path / "sft.json", [{"messages": [{"role": "user", "content": "Q"},
                                                      {"role": "assistant", "content": "A"}]}])
    with pytest.raises(DataError, match=r"sft.json: --stage dpo needs preference pairs .* --stage sft"):
        load_preference_samples(sft, "dpo")
    with pytest.raises(DataError, match=r"sft.json: --stage kto needs completions labelled"):
        load_preference_samples(sft, "kto")
    bad = write(tmp_path / "bad.json", [SHAPES["trl strings"], {"prompt": "Q", "chosen": "A", "rejected": "A"},
                                        {"prompt": "Q", "chosen": "A"}])
    with pytest.raises(DataError) as error:
        load_preference_samples(bad, "dpo")
    assert "2 problem(s)" in str(error.value) and "sample 1: 'chosen' and 'rejected' are identical" in str(error.value)
    assert "sample 2: missing 'rejected'" in str(error.value)
    kto = write(tmp_path / "kto.json", [{"prompt": "Q", "completion": "A", "label": "yes"}])
    with pytest.raises(DataError, match="sample 0: 'label' must be true or false"):
        load_preference_samples(kto, "kto")


def test_dataset_drops_untrainable_pairs_and_describes_a_pair(qwen3_tokenizer, caplog):
    from chatft.data.preference import PreferenceCollator, PreferenceDataset, describe_pair

    pairs = [read({"prompt": "Q " * 40, "chosen": "A", "rejected": "B"}),
             read({"prompt": "Who are you?", "chosen": "Tessa.", "rejected": "An AI."}, index=1)]
    dataset = PreferenceDataset(pairs, qwen3_tokenizer, 30)
    assert len(dataset) == 1 and "Dropped 1 of 2 pairs" in caplog.text
    text = describe_pair(dataset.pairs[0], qwen3_tokenizer)
    assert text.endswith("--- chosen:\n[[Tessa.<|im_end|>]]\n--- rejected:\n[[An AI.<|im_end|>]]")
    assert "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n" in text
    batch = PreferenceCollator()([dataset[0], dataset[0]])
    pair = dataset.pairs[0]
    per_pair = len(pair.prompt_ids) + len(pair.chosen_ids) + 1 + len(pair.rejected_ids)
    assert batch["input_ids"].shape == (1, 2 * per_pair)
    assert sorted(set(batch["reply_index"][0].tolist())) == [-1, 0, 1, 2, 3]

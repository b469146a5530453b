"""Label masks on real tokenizers: labelled tokens decode to exactly each reply + <|im_end|>,
and input_ids equal the tokenization of the rendered ChatML text (and of apply_chat_template)."""

import json
import subprocess
import sys

import pytest

from chatft.data.chat_format import (
    IGNORE_INDEX, IM_END, Turn, chatml_template, describe_sample, render_chatml, to_conversation, to_turns,
    tokenize_conversation,
    tokenize_conversations,
)
from support import ROOT, alpaca_to_conversations, shared_data, shared_data_path

SYSTEM = "You are a helpful assistant."

# Turn lists (a sample's "conversations" value, without the sample around it): the cases a label mask must get right
TURN_LISTS = [
    [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello! How can I help?"}],
    [{"from": "system", "value": "Answer in one word."}, {"from": "user", "value": "Capital of France?"},
     {"from": "assistant", "value": "Paris"}, {"from": "user", "value": "And of Italy?"},
     {"from": "assistant", "value": "Rome"}],
    [{"from": "system", "value": ""}, {"from": "user", "value": "empty system prompt"}, {"from": "assistant", "value": "ok"}],
    [{"from": "user", "value": "안녕하세요? 자기소개 해 주세요."}, {"from": "assistant", "value": "안녕하세요! 저는 도우미입니다. 😀"},
     {"from": "user", "value": "你好，你是谁？"}, {"from": "assistant", "value": "我是一个乐于助人的助手。🚀✨"}],
    [{"from": "user", "value": "  spaces around  "}, {"from": "assistant", "value": "  reply with spaces  "}],
    [{"from": "user", "value": "tabs\tand\ttrailing newline\n"}, {"from": "assistant", "value": "line one\nline two\n\n"}],
    [{"from": "user", "value": "code?"}, {"from": "assistant", "value": "```python\nprint('hi')\n```"}],
    [{"from": "user", "value": "emoji only"}, {"from": "assistant", "value": "👍🏽👨‍👩‍👧"}],
    [{"from": "user", "value": "numbers"}, {"from": "assistant", "value": "12345 + 678 = 13023"}],
    [{"from": "assistant", "value": "a leading assistant turn is dropped"}, {"from": "user", "value": "q"},
     {"from": "assistant", "value": "a"}],
]


def expected_text(conversation, system=SYSTEM):
    """The ChatML rendering, written out independently of chatft."""
    turns = [t for t in conversation]
    if turns[0]["from"] == "system":
        system, turns = turns[0]["value"], turns[1:]
    if turns[0]["from"] == "assistant":
        turns = turns[1:]
    text = f"<|im_start|>system\n{system}<|im_end|>\n"
    for t in turns:
        text += f"<|im_start|>{t['from']}\n{t['value']}<|im_end|>\n"
    return text


def labelled_runs(tokenizer, sample):
    runs, current = [], []
    for token_id, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == token_id, "a label must be the token at its own position (the model shifts)"
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def replies(conversation):
    return [turn.content for turn in to_turns(conversation) if turn.role == "assistant"]


def assert_run_is_reply(run, reply):
    """A labelled run is the reply and its <|im_end|>. Only where the reply starts with whitespace that the
    tokenizer merges into one token with the newline after the role name ("\n" + "  text" -> "\n ", " text")
    does that shared token, which the model must generate, bring the newline along."""
    if reply[:1].isspace() and run == "\n" + reply + IM_END:
        return
    assert run == reply + IM_END


def check_conversation(tokenizer, conversation):
    sample = tokenize_conversation(to_turns(conversation), tokenizer, max_len=100_000, system_message=SYSTEM)
    text = expected_text(conversation)
    assert sample.input_ids == tokenizer(text, add_special_tokens=False).input_ids
    runs = labelled_runs(tokenizer, sample)
    assert len(runs) == len(replies(conversation))
    for run, reply in zip(runs, replies(conversation)):
        assert_run_is_reply(run, reply)
    return sample


@pytest.fixture(params=["smollm2", "qwen"])
def tokenizer(request, smollm2_tokenizer, qwen3_tokenizer):
    return smollm2_tokenizer if request.param == "smollm2" else qwen3_tokenizer


@pytest.mark.parametrize("conversation", TURN_LISTS, ids=range(len(TURN_LISTS)))
def test_labels_are_exactly_the_replies(tokenizer, conversation):
    check_conversation(tokenizer, conversation)


def check_tool_conversation(tokenizer, qwen3_tokenizer, conversation):
    """A conversation with tool calls and results, against Qwen's own chat template (Qwen3's, written independently
    of chatft): input_ids are the tokens of the template's text (less the empty think block it puts in the final
    reply), and the labelled runs are the body of each assistant message in that text (its reply and calls), with
    its <|im_end|>; tool results and definitions are in the text, never labelled."""
    messages, tools = openai_messages(conversation)
    whole = qwen3_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    cut = whole.rindex(QWEN3_EMPTY_THINK)
    text = whole[:cut] + whole[cut + len(QWEN3_EMPTY_THINK):]
    sample = tokenize_conversation(conversation, tokenizer, max_len=100_000, system_message=SYSTEM)
    assert sample.input_ids == tokenizer(text, add_special_tokens=False).input_ids
    bodies = [part.split(IM_END)[0] for part in text.split("<|im_start|>assistant\n")[1:]]
    runs = labelled_runs(tokenizer, sample)
    assert len(runs) == len(bodies) == sum(turn.role == "assistant" for turn in conversation.turns)
    for run, body in zip(runs, bodies):
        assert_run_is_reply(run, body)
    return runs


def test_public_data_converted_masks(tokenizer, qwen3_tokenizer, glaive_conversations):
    samples = (
        alpaca_to_conversations(shared_data("alpaca_en_demo.json"))[:150]
        + alpaca_to_conversations(shared_data("identity.json"), {"{{name}}": "Tessa", "{{author}}": "Lumen Labs"})
    )
    for sample in samples:
        check_conversation(tokenizer, sample["conversations"])
    # the ShareGPT tool-call file as chatft.data.formats reads it: calls, results and tool definitions rendered
    runs = [check_tool_conversation(tokenizer, qwen3_tokenizer, c) for c in glaive_conversations[:100]]
    assert sum("<tool_call>" in run for sample_runs in runs for run in sample_runs) > 50


def test_reply_starting_with_newline(qwen3_tokenizer):
    # Qwen's tokenizer joins "assistant\n" + "\nText" into one "\n\n" token: input_ids stay those of the
    # rendered text, and that token is trained, since it carries the reply's first character.
    conversation = [{"from": "user", "value": "q"}, {"from": "assistant", "value": "\nText"}]
    sample = tokenize_conversation(to_turns(conversation), qwen3_tokenizer, 1000, SYSTEM)
    assert sample.input_ids == qwen3_tokenizer(expected_text(conversation), add_special_tokens=False).input_ids
    assert labelled_runs(qwen3_tokenizer, sample) == ["\n\nText" + IM_END]


def test_template_reproduces_training_tokens(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # a private copy to modify
    for system in (SYSTEM, "Système: réponds en français. 🚀", ""):
        tokenizer.chat_template = chatml_template(system)
        for conversation in TURN_LISTS:
            turns = to_turns(conversation)
            messages = [{"role": t.role, "content": t.content} for t in turns]
            text, _ = render_chatml(turns, system)
            assert tokenizer.apply_chat_template(messages, tokenize=False) == text
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            assert ids == tokenize_conversation(turns, tokenizer, 100_000, system).input_ids
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
        assert prompt == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_truncation_at_every_boundary(tokenizer):
    conversation = TURN_LISTS[3]
    full = tokenize_conversation(to_turns(conversation), tokenizer, 100_000, SYSTEM)
    for max_len in range(1, len(full.input_ids) + 1):
        cut = tokenize_conversation(to_turns(conversation), tokenizer, max_len, SYSTEM)
        assert cut.input_ids == full.input_ids[:max_len]
        assert cut.labels == full.labels[:max_len]
    first_reply_start = full.labels.index(next(label for label in full.labels if label != IGNORE_INDEX))
    assert tokenize_conversation(to_turns(conversation), tokenizer, first_reply_start, SYSTEM).num_trainable == 0
    assert tokenize_conversation(to_turns(conversation), tokenizer, first_reply_start + 1, SYSTEM).num_trainable == 1


def test_system_turn_overrides_system_message():
    text, spans = render_chatml([Turn("system", "S"), Turn("user", "u"), Turn("assistant", "a")], "default")
    assert text.startswith("<|im_start|>system\nS<|im_end|>\n") and "default" not in text
    assert [text[a:b] for a, b in spans] == ["a<|im_end|>"]


def test_leading_assistant_turn_dropped():
    turns = to_turns([{"from": "system", "value": "s"}, {"from": "assistant", "value": "x"},
                      {"from": "user", "value": "u"}, {"from": "assistant", "value": "a"}])
    assert [t.role for t in turns] == ["system", "user", "assistant"]


def test_qwen_compatible_preprocess(qwen3_tokenizer):
    """Qwen's shape: one row per source, in order, padded to max_len; an untrainable source keeps its row."""
    from finetune import preprocess

    sources = [TURN_LISTS[0], [{"from": "user", "value": "x " * 300}, {"from": "assistant", "value": "y"}],
               TURN_LISTS[1]]
    batch = preprocess(sources, qwen3_tokenizer, max_len=64)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(batch[name].shape == (3, 64) for name in batch)
    assert (batch["labels"][1] == IGNORE_INDEX).all()  # no reply left within 64 tokens: kept, nothing to learn
    for row, source in ((0, TURN_LISTS[0]), (2, TURN_LISTS[1])):
        expected = qwen3_tokenizer(expected_text(source), add_special_tokens=False).input_ids
        n = len(expected)
        assert batch["input_ids"][row, :n].tolist() == expected and batch["attention_mask"][row].sum() == n
        assert (batch["input_ids"][row, n:] == qwen3_tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and (batch["labels"][row, :n] != IGNORE_INDEX).any()
    assert batch["attention_mask"][1].all()  # truncated to max_len: every position is the sample's


def test_describe_sample_marks_trained_spans(qwen3_tokenizer):
    sample = tokenize_conversation(to_turns(TURN_LISTS[3]), qwen3_tokenizer, 1000, SYSTEM)
    shown = describe_sample(sample, qwen3_tokenizer)
    assert "[[안녕하세요! 저는 도우미입니다. 😀<|im_end|>]]" in shown
    assert "[[我是一个乐于助人的助手。🚀✨<|im_end|>]]" in shown
    assert shown.count("[[") == 2


def test_one_batched_call_equals_one_call_per_sample(tokenizer, glaive_conversations):
    """Offsets of all samples are resolved together: no sample's labels may leak into its neighbour's."""
    conversations = ([to_turns(s["conversations"]) for s in alpaca_to_conversations(shared_data("alpaca_en_demo.json"))[:60]]
                     + glaive_conversations[:40]  # with tools: calls, results and definitions
                     + [to_turns(c) for c in TURN_LISTS])
    for max_len in (48, 100_000):
        batched = tokenize_conversations(conversations, tokenizer, max_len, SYSTEM)
        assert batched == [tokenize_conversation(turns, tokenizer, max_len, SYSTEM) for turns in conversations]
        for sample, turns in zip(batched, conversations):
            text, _ = render_chatml(turns, SYSTEM)
            assert sample.input_ids == tokenizer(text, add_special_tokens=False).input_ids[:max_len]
    assert tokenize_conversations([], tokenizer, 10, SYSTEM) == []


# Tool calls: rendered as Qwen2.5/Qwen3's own chat template renders them, trained on calls, not on results.

QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"  # Qwen3's template adds this to the final assistant message only


def openai_messages(conversation, system=SYSTEM):
    """A `Conversation` as the OpenAI-style messages and tools that `apply_chat_template` takes."""
    messages = [{"role": "system", "content": system}]
    for turn in conversation.turns:
        message = {"role": turn.role, "content": turn.content}
        if turn.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                                     for c in turn.tool_calls]
        messages.append(message)
    return messages, [json.loads(tool) for tool in conversation.tools] or None


@pytest.fixture(scope="module")
def glaive_conversations():
    """The public ShareGPT tool-call file as chatft.data.formats reads it (every tool turn kept)."""
    from chatft.data.datasets import load_samples

    return load_samples(str(shared_data_path("glaive_toolcall_en_demo.json")))


def test_tool_calls_render_as_qwens_own_template(qwen3_tokenizer, glaive_conversations):
    """Every glaive sample, with the real Qwen tokenizer's chat template (Qwen3's, with tool support):
    every prompt the model answers at inference (all turns before an assistant turn, plus the generation
    prompt) is exactly the training text up to that reply; the whole conversation is the training text
    but for Qwen3's empty think block in its final reply (a thinking-mode marker, not part of ChatML)."""
    assert "<tool_call>" in qwen3_tokenizer.chat_template
    checked_prompts = 0
    for conversation in glaive_conversations:
        text, spans = render_chatml(conversation, SYSTEM)
        messages, tools = openai_messages(conversation)
        whole = qwen3_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        cut = whole.rindex(QWEN3_EMPTY_THINK)
        assert whole[:cut] + whole[cut + len(QWEN3_EMPTY_THINK):] == text
        assistant_turns = [k + 1 for k, turn in enumerate(conversation.turns) if turn.role == "assistant"]
        for k, (start, _) in zip(assistant_turns, spans):
            prompt = qwen3_tokenizer.apply_chat_template(messages[:k], tools=tools, tokenize=False,
                                                        add_generation_prompt=True)
            assert prompt == text[:start]
            checked_prompts += 1
    assert sum(bool(c.tools) for c in glaive_conversations) == 191 and checked_prompts >= 957


def test_tool_calls_trained_results_not(tokenizer, glaive_conversations):
    conversation = glaive_conversations[0]  # reply, call, result, reply, reply
    sample = tokenize_conversation(conversation, tokenizer, 100_000, SYSTEM)
    call = ('<tool_call>\n{"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", '
            '"rice"]}}\n</tool_call>')
    replies = [t.content for t in conversation.turns if t.role == "assistant"]
    assert labelled_runs(tokenizer, sample) == [replies[0] + IM_END, call + IM_END] + [r + IM_END for r in replies[2:]]
    assert "<tool_response>" in tokenizer.decode(sample.input_ids)
    for conversation in glaive_conversations:  # results and tool definitions are never trained
        trained = "".join(labelled_runs(tokenizer, tokenize_conversation(conversation, tokenizer, 100_000, SYSTEM)))
        assert "<tool_response>" not in trained and "<tools>" not in trained


def test_template_reproduces_tool_conversations(smollm2_tokenizer, glaive_conversations):
    tokenizer = smollm2_tokenizer.__class__.from_pretrained(smollm2_tokenizer.name_or_path)  # a private copy
    tokenizer.chat_template = chatml_template(SYSTEM)
    for conversation in glaive_conversations[:60]:
        messages, tools = openai_messages(conversation)
        text, _ = render_chatml(conversation, SYSTEM)
        assert tokenizer.apply_chat_template(messages[1:], tools=tools, tokenize=False) == text
        bare_tools = [json.loads(t)["function"] for t in conversation.tools] or None  # wrapped the same way
        assert tokenizer.apply_chat_template(messages, tools=bare_tools, tokenize=False) == text


def test_parallel_calls_and_string_arguments():
    turns = to_turns([
        {"from": "user", "value": "q"}, {"from": "assistant", "value": "Two calls."},
        {"from": "function_call", "value": '[{"name": "f", "arguments": "{\\"x\\": 1}"}, '
                                           '{"type": "function", "function": {"name": "g", "arguments": {"y": "é"}}}]'},
        {"from": "observation", "value": "1"}, {"from": "observation", "value": "2"},
        {"from": "assistant", "value": "done"}])
    text, spans = render_chatml(turns, "s")
    assert text == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nTwo calls.\n"
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {"y": "é"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\ndone<|im_end|>\n")
    assert [text[a:b] for a, b in spans][1] == "done<|im_end|>"


def test_the_saved_template_renders_reasoning_as_training_does(qwen3_tokenizer):
    """ChatML with traces: every assistant turn keeps its reasoning in a <think> block, in training and in the
    template saved with the model, so the model is served the text it was trained on."""
    tokenizer = qwen3_tokenizer.__class__.from_pretrained(qwen3_tokenizer.name_or_path)
    tokenizer.chat_template = chatml_template(SYSTEM)
    conversation = [{"from": "user", "value": "2+2?"},
                    {"from": "assistant", "value": "4", "reasoning_content": "add\n\nthen check"},
                    {"from": "user", "value": "and 3+3?"}, {"from": "assistant", "value": "6"},
                    {"from": "user", "value": "思考一下: 5+5?"},
                    {"from": "assistant", "value": "<think>\n十\n</think>\n\n10"}]
    turns = to_turns(conversation)
    assert [t.reasoning for t in turns if t.role == "assistant"] == ["add\n\nthen check", "", "十"]
    messages = [{"role": t.role, "content": t.content} | ({"reasoning_content": t.reasoning} if t.reasoning else {})
                for t in turns]
    text, spans = render_chatml(turns, SYSTEM)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == text
    assert [text[a:b] for a, b in spans] == ["<think>\nadd\n\nthen check\n</think>\n\n4<|im_end|>", "6<|im_end|>",
                                             "<think>\n十\n</think>\n\n10<|im_end|>"]


# --- the qwen3 format: Qwen3's own template, reasoning traces included ---------------------------------------

def generated_conversations(count: int, seed: int = 0):
    """Single and multi-turn conversations, with and without reasoning (inline <think> or reasoning_content, with
    blank lines), with tools and parallel calls, non-ASCII, with and without a system prompt."""
    import random

    rng = random.Random(seed)
    words = ["alpha", "βeta", "数据", "🚀 launch", "naïve", "x = 1\n\ny = 2", "  spaced  ", "안녕"]
    text = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))  # noqa: E731
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Look up a word",
                                               "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    for index in range(count):
        use_tools = rng.random() < 0.3
        turns = [{"from": "system", "value": text()}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            turns.append({"from": "user", "value": text()})
            reasoning = rng.choice(["", "", text(), text() + "\n\n" + text()])
            if use_tools and rng.random() < 0.6:
                calls = [{"name": "lookup", "arguments": {"q": text()}} for _ in range(rng.randint(1, 2))]
                turns.append({"from": "function_call", "value": json.dumps(calls, ensure_ascii=False)}
                             | ({"reasoning_content": reasoning} if reasoning else {}))
                turns += [{"from": "observation", "value": text()} for _ in calls]
                reasoning = rng.choice(["", text()])
            answer = text()
            if reasoning and rng.random() < 0.3:  # the trace inline, as some data carries it
                turns.append({"from": "assistant", "value": f"<think>\n{reasoning}\n</think>\n\n{answer}"})
            else:
                turns.append({"from": "assistant", "value": answer} | ({"reasoning_content": reasoning} if reasoning else {}))
        yield {"id": f"g{index}", "conversations": turns} | ({"tools": tools} if use_tools else {})


def template_messages(conversation):
    """A Conversation as the messages (reasoning as `reasoning_content`) and tools apply_chat_template takes."""
    messages = []
    for turn in conversation.turns:
        message = {"role": turn.role, "content": turn.content}
        if turn.reasoning:
            message["reasoning_content"] = turn.reasoning
        if turn.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                                     for c in turn.tool_calls]
        messages.append(message)
    return messages, [json.loads(tool) for tool in conversation.tools] or None


def check_trained_as_generated(tokenizer, conversation, samples, messages_of=None):
    """Each of a conversation's training samples (qwen3 format) against the real template: its text and tokens are
    apply_chat_template on its messages, whole; for each reply it trains, the text before the reply is the template's
    prompt for it (add_generation_prompt=True) and the reply's labelled text is exactly what the template renders
    after that prompt when the reply is the last message (the reply as generated: think block, empty without
    reasoning, answer, calls, <|im_end|>); every trained reply of the conversation is trained in exactly one sample.
    `messages_of`: the template's messages for a sample (default: template_messages)."""
    from chatft.data.chat_format import _is_trained, render_qwen3

    messages_of = messages_of or (lambda part: template_messages(part)[0])
    tools = template_messages(conversation)[1]
    trained_turns = []
    for part in samples:
        messages = messages_of(part)
        text, spans = render_qwen3(part)
        assert text == tokenizer.apply_chat_template(messages, tools=tools, tokenize=False), conversation.id
        ids = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"]
        tokenized = tokenize_conversation(part, tokenizer, 100_000, chat_format="qwen3")
        assert tokenized.input_ids == ids
        trained = [j for j, turn in enumerate(part.turns) if turn.role == "assistant" and _is_trained(part, j)]
        assert len(spans) == len(trained)
        for j, (start, end) in zip(trained, spans):
            prompt = tokenizer.apply_chat_template(messages[:j], tools=tools, tokenize=False, add_generation_prompt=True)
            assert text[:start] == prompt, (conversation.id, j)
            generated = tokenizer.apply_chat_template(messages[: j + 1], tools=tools, tokenize=False)
            assert generated.startswith(prompt) and generated.endswith(IM_END + "\n")
            assert text[start:end] == generated[len(prompt) : -1], (conversation.id, j)  # less the "\n" after it
            assert text[start:end].startswith("<think>\n")  # Qwen3 in thinking mode always opens one
            trained_turns.append(j)
        assert labelled_runs(tokenizer, tokenized) == [text[a:b] for a, b in spans]
    expected = [j for j, turn in enumerate(conversation.turns) if turn.role == "assistant" and _is_trained(conversation, j)]
    assert sorted(trained_turns) == expected, conversation.id  # each reply trained once, none left out


def test_the_qwen3_format_is_qwen3s_own_template(qwen3_tokenizer):
    """On the real Qwen3 tokenizer, 300 generated conversations (check_trained_as_generated): every reply, in every
    query, with or without reasoning, tool calls and results, is trained exactly as the template renders it when the
    model generates it, in exactly the template's prompt for it. Multi-turn conversations are split, one sample per
    user query (and per tool step without reasoning)."""
    from chatft.data.chat_format import is_thinking_template, qwen3_template, training_conversations

    assert is_thinking_template(qwen3_tokenizer.chat_template) and not is_thinking_template(chatml_template())
    assert qwen3_template() == qwen3_tokenizer.chat_template  # what a run forced to qwen3 saves: Qwen3's, verbatim
    split = unsplit_multi_turn = 0
    for sample in generated_conversations(300):
        conversation = to_conversation(sample)
        samples = training_conversations(conversation, "qwen3")
        split += len(samples) > 1
        unsplit_multi_turn += len(samples) == 1 and sum(t.role == "user" for t in conversation.turns) > 1
        check_trained_as_generated(qwen3_tokenizer, conversation, samples)
    assert split > 100 and unsplit_multi_turn == 0


def test_qwen3_training_samples_of_a_multi_turn_reasoning_conversation():
    from chatft.data.chat_format import render_qwen3, training_conversations

    conversation = to_conversation({"conversations": [
        {"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4", "reasoning_content": "add"},
        {"from": "user", "value": "3+3?"}, {"from": "assistant", "value": "6", "reasoning_content": "add again"}]})
    first, second = training_conversations(conversation, "qwen3")
    assert [render_qwen3(c)[0][slice(*render_qwen3(c)[1][0])] for c in (first, second)] == [
        "<think>\nadd\n</think>\n\n4<|im_end|>", "<think>\nadd again\n</think>\n\n6<|im_end|>"]
    assert "add\n" not in render_qwen3(second)[0].split("3+3?")[0].split("assistant\n", 1)[1]  # old thought dropped
    [last_only] = training_conversations(conversation, "qwen3", "last")
    assert len(render_qwen3(last_only)[1]) == 1 and last_only.turns == conversation.turns
    assert training_conversations(conversation, "chatml") == [conversation]


def test_qwen3_multi_turn_replies_without_reasoning_are_trained_with_their_empty_think_block(qwen3_tokenizer):
    """No reasoning anywhere: each query's reply still gets its own sample, trained as Qwen3 generates it
    (`<think>\n\n</think>\n\nb<|im_end|>`, not `b<|im_end|>`, which is how the template shows it in a later prompt);
    --reasoning_turns last keeps the one sample, training only the last reply."""
    from chatft.data.chat_format import render_qwen3, training_conversations

    conversation = to_conversation({"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "user", "value": "a"}, {"from": "assistant", "value": "b"},
        {"from": "user", "value": "c"}, {"from": "assistant", "value": "d"},
        {"from": "user", "value": "e"}, {"from": "assistant", "value": "f", "reasoning_content": "think f"}]})
    samples = training_conversations(conversation, "qwen3")
    assert [render_qwen3(c)[0][slice(*render_qwen3(c)[1][0])] for c in samples] == [
        "<think>\n\n</think>\n\nb<|im_end|>", "<think>\n\n</think>\n\nd<|im_end|>",
        "<think>\nthink f\n</think>\n\nf<|im_end|>"]
    assert [len(c.turns) for c in samples] == [3, 5, 7] and [len(render_qwen3(c)[1]) for c in samples] == [1, 1, 1]
    check_trained_as_generated(qwen3_tokenizer, conversation, samples)
    [last] = training_conversations(conversation, "qwen3", "last")
    assert last.turns == conversation.turns and last.trained == (6,)
    single = to_conversation({"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]})
    assert training_conversations(single, "qwen3") == [single]  # one query: the conversation as it is


def test_qwen3_tool_steps_are_trained_as_generated(qwen3_tokenizer):
    """Within one query: a call without reasoning is generated with an empty think block, but the template shows it
    without one in the prompt of the reply after its result, so it ends its own sample; a call with reasoning
    renders the same either way and shares the sample of the reply after it."""
    from chatft.data.chat_format import render_qwen3, training_conversations

    tools = [{"name": "lookup", "description": "Look up", "parameters": {"type": "object", "properties": {}}}]
    call = {"from": "function_call", "value": '{"name": "lookup", "arguments": {"q": "x"}}'}
    for call_reasoning, expected in (({}, 3), ({"reasoning_content": "need x"}, 2)):
        conversation = to_conversation({"tools": tools, "conversations": [
            {"from": "user", "value": "q1"}, {"from": "assistant", "value": "a1"},
            {"from": "user", "value": "q2"}, call | call_reasoning, {"from": "observation", "value": "x is 1"},
            {"from": "assistant", "value": "x is 1", "reasoning_content": "read it"}]})
        samples = training_conversations(conversation, "qwen3")
        assert len(samples) == expected
        check_trained_as_generated(qwen3_tokenizer, conversation, samples)
        text, spans = render_qwen3(samples[1])
        think = f"<think>\n{call_reasoning.get('reasoning_content', '')}\n</think>\n\n"
        assert text[slice(*spans[0])] == think + '<tool_call>\n{"name": "lookup", "arguments": {"q": "x"}}\n</tool_call><|im_end|>'
        [last] = training_conversations(conversation, "qwen3", "last")
        assert last.turns == conversation.turns and last.trained == (3, 5)


def test_qwen3_loss_weights_and_ignore_empty_think_survive_the_split(qwen3_tokenizer):
    """Each sample trains its replies with their own weights; a weight-0 reply is context in the later samples and
    gets none of its own; --ignore_empty_think leaves each split reply's empty block rendered, untrained."""
    from dataclasses import replace

    from chatft.data.chat_format import span_weights, training_conversations

    conversation = to_conversation({"conversations": [
        {"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}, {"from": "user", "value": "c"},
        {"from": "assistant", "value": "d"}, {"from": "user", "value": "e"}, {"from": "assistant", "value": "f"}]})
    conversation = replace(conversation, turns=tuple(replace(t, weight=w) for t, w in zip(conversation.turns,
                                                                                        [1, 2, 1, 0, 1, 0.5])))
    samples = training_conversations(conversation, "qwen3")
    assert [len(c.turns) for c in samples] == [2, 6] and [span_weights(c) for c in samples] == [[2], [0.5]]
    check_trained_as_generated(qwen3_tokenizer, conversation, samples)
    ignoring = training_conversations(conversation, "qwen3", ignore_empty_think=True)
    for part in ignoring:
        tokenized = tokenize_conversation(part, qwen3_tokenizer, 1000, chat_format="qwen3")
        assert labelled_runs(qwen3_tokenizer, tokenized) == [part.turns[-1].content + IM_END]
        assert tokenized.input_ids == tokenize_conversation(replace(part, empty_think_trained=True), qwen3_tokenizer,
                                                            1000, chat_format="qwen3").input_ids


def test_a_trace_with_two_closing_tags_is_split_as_qwen3s_template_splits_it(qwen3_tokenizer):
    """`<think>a</think>b</think>c`: the reasoning is what precedes the first `</think>`, the answer what follows
    the last (the template's split('</think>')[0] and [-1]); rendered, split and trained as the template renders the
    raw text, in an earlier turn and in the last one."""
    from chatft.data.chat_format import split_reasoning, training_conversations

    raw = "<think>\nfirst thought\n</think>\nstray</think>\n\nthe answer"
    assert split_reasoning(raw) == ("first thought", "the answer")
    assert split_reasoning("<think>\nonly\n</think>\n\nanswer") == ("only", "answer")
    assert split_reasoning("no trace") == ("", "no trace")
    records = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": raw},
               {"role": "user", "content": "q2"}, {"role": "assistant", "content": raw}]
    conversation = to_conversation({"conversations": [{"from": r["role"], "value": r["content"]} for r in records]})
    samples = training_conversations(conversation, "qwen3")
    assert len(samples) == 2
    check_trained_as_generated(qwen3_tokenizer, conversation, samples,
                               messages_of=lambda part: records[: len(part.turns)])  # the raw text, the template splits


def test_rendering_does_not_import_the_data_module():
    """The import circle chat_format -> data -> formats -> chat_format is cut: rendering and labelling stand alone
    (Qwen's `preprocess`, which pads with chatft.data.datasets, lives there)."""
    code = ("import sys, chatft.data.chat_format, chatft.data.formats; "
            "assert 'chatft.data.datasets' not in sys.modules, sorted(m for m in sys.modules if m.startswith('chatft'))")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --- --ignore_empty_think and loss weights ---------------------------------------------------------------------------

def test_ignore_empty_think_leaves_exactly_the_empty_think_block_untrained(qwen3_tokenizer):
    """qwen3 format: the empty block Qwen3's template adds before an answer without reasoning is rendered (the
    tokens are the template's) but not labelled; every other label, and a block with reasoning, stay as they were."""
    from chatft.data.chat_format import training_conversations

    for turns in ([{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}],
                  [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "a"},
                   {"from": "assistant", "value": "b", "reasoning_content": "think b"}, {"from": "user", "value": "c"},
                   {"from": "assistant", "value": "d, 好的 🚀"}]):
        conversation = to_conversation({"conversations": turns})
        parts = training_conversations(conversation, "qwen3")
        ignoring = training_conversations(conversation, "qwen3", ignore_empty_think=True)
        assert len(parts) == len(ignoring)
        for trained, ignored in zip(parts, ignoring):
            before = tokenize_conversation(trained, qwen3_tokenizer, 1000, chat_format="qwen3")
            after = tokenize_conversation(ignored, qwen3_tokenizer, 1000, chat_format="qwen3")
            assert after.input_ids == before.input_ids
            changed = [k for k, (was, now) in enumerate(zip(before.labels, after.labels)) if was != now]
            assert all(after.labels[k] == IGNORE_INDEX for k in changed)
            last = trained.turns[-1]
            assert qwen3_tokenizer.decode([before.input_ids[k] for k in changed]) == (
                "" if last.reasoning else QWEN3_EMPTY_THINK)
            expected = (f"<think>\n{last.reasoning}\n</think>\n\n" if last.reasoning else "") + last.content + IM_END
            assert labelled_runs(qwen3_tokenizer, after)[-1] == expected
    conversation = to_conversation({"conversations": turns})
    assert training_conversations(conversation, "chatml", ignore_empty_think=True) == [conversation]  # no blocks there


def test_describe_sample_shows_loss_weights(qwen3_tokenizer):
    from dataclasses import replace

    turns = to_turns([{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"},
                      {"from": "user", "value": "c"}, {"from": "assistant", "value": "d"},
                      {"from": "user", "value": "e"}, {"from": "assistant", "value": "f"}])
    turns = [replace(turn, weight=w) for turn, w in zip(turns, [1, 2, 1, 0, 1, 1])]
    shown = describe_sample(tokenize_conversation(turns, qwen3_tokenizer, 1000, SYSTEM), qwen3_tokenizer)
    assert "[[b<|im_end|>]](weight 2)" in shown and "[[f<|im_end|>]]\n" in shown
    assert "[[d" not in shown and "assistant\nd<|im_end|>" in shown  # weight 0: shown, not trained

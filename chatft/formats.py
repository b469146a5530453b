"""The data formats people publish -> the seed's conversation samples.

Detected per file from its records (`--data_format` overrides):

    conversations  the seed's: {"id", "conversations": [{"from": "user"|"assistant"|"system", "value": str}]}
    sharegpt       {"conversations": [{"from": "human"|"gpt"|"system", "value": str}], "system"?: str}
    messages       OpenAI-style: {"messages": [{"role": "system"|"user"|"assistant", "content": str}]} (also under
                   "conversations", as some datasets have it)
    alpaca         {"instruction": str, "input"?: str, "output": str, "system"?: str, "history"?: [[query, reply]]}

Tool use, as LLaMA-Factory's ShareGPT writes it, is part of the seed's format too: `function_call` turns (the
assistant's call, JSON `{"name", "arguments"}` or a list of them) and `observation` turns (the tool's result),
with the tool definitions in the sample's `tools` (a list, or that list as JSON text). OpenAI messages carry
the same as `tool_calls` on assistant messages, `tool` messages and `tools`.

Every format becomes the seed's sample, so a conversation gives identical tokens and labels whatever
format it came in. Problems are returned as messages naming the file, sample index, id and field; each
converter also names, for every turn of the sample it returns, where that turn came from in the record.
"""

from __future__ import annotations

import json

from chatft.chat_format import parse_tool_calls

FORMATS = ("auto", "conversations", "sharegpt", "messages", "alpaca")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                  "function_call": "function_call", "observation": "observation", "tool": "observation",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}  # the last: raw ShareGPT dumps
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
# other names for tool turns in published `messages` files: LLaMA-Factory's tags, OpenAI's legacy function role
MESSAGE_ROLE_ALIASES = {"function_call": "function_call", "observation": "observation", "function": "observation"}


def _role_content_turns(turns) -> bool:
    """OpenAI-style turns under another key (`"conversations": [{"role", "content"}]`, as some datasets have it)."""
    return (isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "role" in turns[0]
            and "from" not in turns[0])


def detect_format(record) -> str | None:
    """The format one record is in, or None when it matches none."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list) or _role_content_turns(record.get("conversations")):
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "conversations" in record:
        turns = record["conversations"] if isinstance(record["conversations"], list) else []
        roles = {turn.get("from") for turn in turns if isinstance(turn, dict)}
        return ("sharegpt" if roles & {"human", "gpt", "tool", "chatgpt", "bing", "bard"} or "system" in record
                else "conversations")
    return None


def file_format(records: list, requested: str = "auto") -> str:
    """One file's format: `requested`, else that of its first record in a known format (ShareGPT when any record
    uses ShareGPT's roles or fields: it reads the seed's records too), else the seed's (whose checks then say what
    is missing)."""
    if requested != "auto":
        return requested
    found = [f for f in map(detect_format, records) if f]
    if found and found[0] == "conversations" and "sharegpt" in found:
        return "sharegpt"
    return found[0] if found else "conversations"


def format_mismatch(record, file_format_: str, index: int, path: str) -> str | None:
    """A problem when a record is plainly in another format than its (auto-detected) file's."""
    found = detect_format(record)
    if found is None or found == file_format_ or {found, file_format_} == {"conversations", "sharegpt"}:
        return None
    return (f"{where(path, index, record)}: a record in {found} format in a file detected as {file_format_} (from its first record); use one format "
            "per file")


def sample_name(index: int, record) -> str:
    """How every message names a sample: `sample 3 (id='x')`, or `sample 3` when it has no id."""
    return f"sample {index}" + (f" (id={record['id']!r})" if isinstance(record, dict) and "id" in record else "")


def where(path: str, index: int, record) -> str:
    """`data/train.json: sample 3 (id='x')`: where a problem with a record is, in every message about one."""
    return f"{path}: {sample_name(index, record)}"


def _sample(record: dict, conversations: list[dict]) -> dict:
    """The seed's sample: the record's id and tools (when it has them) and `conversations`."""
    return ({"id": record["id"]} if "id" in record else {}) | {"conversations": conversations} | (
        {"tools": record["tools"]} if record.get("tools") not in (None, "", []) else {})


def _reasoning(turn: dict) -> dict:
    """A turn's reasoning trace (`reasoning_content`, as Qwen3 and OpenAI-compatible servers return it), kept."""
    return {"reasoning_content": turn["reasoning_content"]} if "reasoning_content" in turn else {}


Converted = tuple[dict | None, list[str], list[str]]  # (sample, problems, where each of its turns came from)


def from_sharegpt(record: dict, at: str) -> Converted:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None, [f"{at}: 'conversations' must be a non-empty list of turns"], []
    problems, conversations, sources = [], [], []
    system = record.get("system")
    if system is not None:
        if isinstance(system, str):
            conversations.append({"from": "system", "value": system})
            sources.append("'system'")
        else:
            problems.append(f"{at}: 'system' must be a string, found a {type(system).__name__}")
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            problems.append(f"{at}: conversations[{j}]: expected an object with 'from' and 'value'")
        elif turn["from"] not in SHAREGPT_ROLES:
            problems.append(f"{at}: conversations[{j}]: unknown role {turn['from']!r} in 'from' "
                            f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        else:
            conversations.append({"from": SHAREGPT_ROLES[turn["from"]], "value": turn["value"]}
                                 | _reasoning(turn))
            sources.append(f"conversations[{j}]")
    return (None, problems, []) if problems else (_sample(record, conversations), [], sources)


def from_messages(record: dict, at: str) -> Converted:
    key = "messages" if "messages" in record else "conversations"  # OpenAI turns under either key
    messages = record.get(key)
    if not isinstance(messages, list) or not messages:
        return None, [f"{at}: {key!r} must be a non-empty list of messages"], []
    problems, conversations, sources = [], [], []
    for j, message in enumerate(messages):
        here = f"{at}: {key}[{j}]"
        if not isinstance(message, dict) or "role" not in message:
            problems.append(f"{here}: expected an object with 'role' and 'content'")
            continue
        role, content = message["role"], message.get("content")
        calls = message.get("tool_calls") or message.get("function_call") if role == "assistant" else None
        if role in MESSAGE_ROLE_ALIASES and isinstance(content, str):
            conversations.append({"from": MESSAGE_ROLE_ALIASES[role], "value": content})
            sources.append(f"{key}[{j}]")
        elif role not in MESSAGE_ROLES:
            problems.append(f"{here}: unknown role {role!r} (expected {', '.join(MESSAGE_ROLES)})")
        elif content is None and not calls:
            problems.append(f"{here}: missing 'content'")
        elif content is not None and not isinstance(content, str):
            problems.append(f"{here}: 'content' must be a string, found a {type(content).__name__}")
        elif calls:
            try:
                parsed = parse_tool_calls(calls)
            except ValueError as error:
                problems.append(f"{here}: {'tool_calls' if message.get('tool_calls') else 'function_call'!r}: {error}")
                continue
            if content and content.strip():  # text before the calls: one message, merged back by to_turns
                conversations.append({"from": "assistant", "value": content} | _reasoning(message))
                sources.append(f"{key}[{j}]")
            # arguments as the exact JSON text they render to: an object's, or a text kept verbatim
            conversations.append({"from": "function_call", "value": json.dumps(
                [{"name": call.name, "arguments": call.arguments} for call in parsed], ensure_ascii=False)}
                | ({} if content and content.strip() else _reasoning(message)))
            sources.append(f"{key}[{j}]")
        else:
            conversations.append({"from": "observation" if role == "tool" else role, "value": content}
                                 | _reasoning(message))  # on a non-assistant turn: refused by the checks
            sources.append(f"{key}[{j}]")
    return (None, problems, []) if problems else (_sample(record, conversations), [], sources)


def from_alpaca(record: dict, at: str) -> Converted:
    problems = []
    for field, required in (("instruction", True), ("output", True), ("input", False), ("system", False)):
        if required and field not in record:
            problems.append(f"{at}: missing {field!r}")
        elif field in record and not isinstance(record[field], str) and not (record[field] is None and not required):
            problems.append(f"{at}: {field!r} must be a string, found a {type(record[field]).__name__}")
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair) for pair in history):
        problems.append(f"{at}: 'history' must be a list of [query, reply] string pairs")
    if problems:
        return None, problems, []
    if not record["output"].strip():
        problems.append(f"{at}: 'output' is empty")
    query = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
    if not query.strip():
        problems.append(f"{at}: 'instruction' and 'input' are empty")
    if problems:
        return None, problems, []
    conversations, sources = [], []
    if record.get("system") is not None:
        conversations.append({"from": "system", "value": record["system"]})
        sources.append("'system'")
    for k, (past_query, past_reply) in enumerate(history):
        conversations += [{"from": "user", "value": past_query}, {"from": "assistant", "value": past_reply}]
        sources += [f"history[{k}][0]", f"history[{k}][1]"]
    conversations += [{"from": "user", "value": query}, {"from": "assistant", "value": record["output"]}]
    sources += ["'instruction'", "'output'"]
    return _sample(record, conversations), [], sources


# What each format's reader uses; every other key of a record or turn is reported (ignored_keys), never dropped silently.
RECORD_KEYS = {"conversations": {"id", "conversations", "tools"}, "sharegpt": {"id", "conversations", "system", "tools"},
               "messages": {"id", "messages", "conversations", "tools"},
               "alpaca": {"id", "instruction", "input", "output", "system", "history", "tools"}}
TURN_KEYS = {"conversations": {"from", "value", "reasoning_content"}, "sharegpt": {"from", "value", "reasoning_content"},
             "messages": {"role", "content", "tool_calls", "function_call", "reasoning_content"}}
# keys that carry training signal this toolkit does not train on yet, and what it is
UNSUPPORTED_SIGNAL = {"weight": "per-turn loss weights", "loss": "per-turn loss switches", "train": "per-turn loss switches",
                      "images": "images", "videos": "videos", "audios": "audio", "chosen": "preference pairs",
                      "rejected": "preference pairs", "kto_tag": "KTO labels"}
LIKELY_MEANT = {"reasoning": "reasoning_content", "thinking": "reasoning_content", "thoughts": "reasoning_content",
                "reasoning_text": "reasoning_content", "think": "reasoning_content"}


def ignored_keys(records: list, data_format: str) -> list[str]:
    """One line per key of a record or turn that `data_format`'s reader does not use, with how often it occurs and,
    for keys that carry training signal or look misspelt, what they are."""
    counts: dict[tuple[str, str], int] = {}
    turns_key = "messages" if data_format == "messages" else "conversations"
    for record in records:
        if not isinstance(record, dict):
            continue
        for key in record.keys() - RECORD_KEYS.get(data_format, set()):
            counts[(key, "records")] = counts.get((key, "records"), 0) + 1
        turns = record.get(turns_key, record.get("conversations")) if data_format in TURN_KEYS else None
        for turn in turns if isinstance(turns, list) else []:
            if isinstance(turn, dict):
                for key in turn.keys() - TURN_KEYS[data_format]:
                    where_ = "messages" if data_format == "messages" else "turns"
                    counts[(key, where_)] = counts.get((key, where_), 0) + 1
    lines = []
    for (key, where_), count in sorted(counts.items()):
        note = (f": {UNSUPPORTED_SIGNAL[key]}, not supported yet" if key in UNSUPPORTED_SIGNAL
                else f": did you mean {LIKELY_MEANT[key]!r}?" if key in LIKELY_MEANT else "")
        lines.append(f"{key!r} in {count} {where_}{note}")
    return lines


def to_sample(record, data_format: str, index: int, path: str) -> Converted:
    """(the seed's sample, problems, where each of its turns came from) for one record of a file in `data_format`;
    the seed's format passes through (its turns are named by chatft.data's checks)."""
    at = where(path, index, record)
    if data_format == "conversations":
        return record, [], []  # checked, like every converted sample, by chatft.data.sample_problems
    if not isinstance(record, dict):
        return None, [f"{at}: expected an object ({data_format} format), found a {type(record).__name__}"], []
    return {"sharegpt": from_sharegpt, "messages": from_messages, "alpaca": from_alpaca}[data_format](record, at)

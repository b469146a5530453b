"""The data formats people publish -> the seed's conversation samples.

Detected per file from its records (`--data_format` overrides):

    conversations  the seed's: {"id", "conversations": [{"from": "user"|"assistant"|"system", "value": str}]}
    sharegpt       {"conversations": [{"from": "human"|"gpt"|"system", "value": str}], "system"?: str}
    messages       OpenAI-style: {"messages": [{"role": "system"|"user"|"assistant", "content": str}]}
    alpaca         {"instruction": str, "input"?: str, "output": str, "system"?: str, "history"?: [[query, reply]]}

Every format becomes the seed's sample, so a conversation gives identical tokens and labels whatever
format it came in. Problems are returned as messages naming the file, sample index, id and field.
"""

from __future__ import annotations

FORMATS = ("auto", "conversations", "sharegpt", "messages", "alpaca")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
TOOL_ROLES = ("function_call", "observation", "tool", "function")


def detect_format(record) -> str | None:
    """The format one record is in, or None when it matches none."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "conversations" in record:
        turns = record["conversations"] if isinstance(record["conversations"], list) else []
        roles = {turn.get("from") for turn in turns if isinstance(turn, dict)}
        return "sharegpt" if roles & {"human", "gpt", *TOOL_ROLES} or "system" in record else "conversations"
    return None


def file_format(records: list, requested: str = "auto") -> str:
    """One file's format: `requested`, else that of its first record in a known format, else the seed's (whose
    checks then say what is missing)."""
    if requested != "auto":
        return requested
    return next((found for found in map(detect_format, records) if found), "conversations")


def where(path: str, index: int, record) -> str:
    name = f"{path}: sample {index}"
    return name + (f" (id={record['id']!r})" if isinstance(record, dict) and "id" in record else "")


def _with_id(record: dict, conversations: list[dict]) -> dict:
    return ({"id": record["id"]} if "id" in record else {}) | {"conversations": conversations}


def from_sharegpt(record: dict, at: str) -> tuple[dict | None, list[str]]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None, [f"{at}: 'conversations' must be a non-empty list of turns"]
    problems, conversations = [], []
    system = record.get("system")
    if system is not None:
        if isinstance(system, str):
            conversations.append({"from": "system", "value": system})
        else:
            problems.append(f"{at}: 'system' must be a string, found a {type(system).__name__}")
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            problems.append(f"{at}: conversations[{j}]: expected an object with 'from' and 'value'")
        elif turn["from"] in TOOL_ROLES:
            problems.append(f"{at}: conversations[{j}]: {turn['from']!r} turns (tool calls) are not supported yet")
        elif turn["from"] not in SHAREGPT_ROLES:
            problems.append(f"{at}: conversations[{j}]: unknown role {turn['from']!r} in 'from' "
                            f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        else:
            conversations.append({"from": SHAREGPT_ROLES[turn["from"]], "value": turn["value"]})
    return (None, problems) if problems else (_with_id(record, conversations), [])


def from_messages(record: dict, at: str) -> tuple[dict | None, list[str]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, [f"{at}: 'messages' must be a non-empty list of messages"]
    problems, conversations = [], []
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            problems.append(f"{at}: messages[{j}]: expected an object with 'role' and 'content'")
        elif message["role"] in TOOL_ROLES or message.get("tool_calls"):
            problems.append(f"{at}: messages[{j}]: tool calls and tool results are not supported yet")
        elif message["role"] not in ("system", "user", "assistant"):
            problems.append(f"{at}: messages[{j}]: unknown role {message['role']!r} (expected system, user or assistant)")
        elif not isinstance(message["content"], str):
            problems.append(f"{at}: messages[{j}]: 'content' must be a string, found a "
                            f"{type(message['content']).__name__}")
        else:
            conversations.append({"from": message["role"], "value": message["content"]})
    return (None, problems) if problems else (_with_id(record, conversations), [])


def from_alpaca(record: dict, at: str) -> tuple[dict | None, list[str]]:
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
        return None, problems
    if not record["output"].strip():
        problems.append(f"{at}: 'output' is empty")
    query = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
    if not query.strip():
        problems.append(f"{at}: 'instruction' and 'input' are empty")
    if problems:
        return None, problems
    conversations = [{"from": "system", "value": record["system"]}] if record.get("system") is not None else []
    for past_query, past_reply in history:
        conversations += [{"from": "user", "value": past_query}, {"from": "assistant", "value": past_reply}]
    conversations += [{"from": "user", "value": query}, {"from": "assistant", "value": record["output"]}]
    return _with_id(record, conversations), []


def to_sample(record, data_format: str, index: int, path: str) -> tuple[dict | None, list[str]]:
    """(the seed's sample, problems) for one record of a file in `data_format`; the seed's format passes through."""
    at = where(path, index, record)
    if data_format == "conversations":
        return record, []  # checked, like every converted sample, by chatft.data.sample_problems
    if not isinstance(record, dict):
        return None, [f"{at}: expected an object ({data_format} format), found a {type(record).__name__}"]
    return {"sharegpt": from_sharegpt, "messages": from_messages, "alpaca": from_alpaca}[data_format](record, at)

"""The data formats people publish -> `Conversation`s, each record checked as it is read.

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

Per-turn loss weights, as LLaMA-Factory, ms-swift and axolotl read them: a turn's `weight` (a number >= 0) or `loss`
(true/false, or a number) scales its tokens in the loss (0: context only, not trained); on the turns of every format
but alpaca's. Only assistant and tool-call turns are trained, so another turn may only carry weight 0.

`read_record` gives one record's `Conversation` (chatft.data.chat_format), so a conversation gives identical tokens and
labels whatever format it came in. Each format's reader names each turn in the seed's roles (`ROLES`), and every
format's turns are then checked and built by the same rules (`_read_turns`). Problems are returned as messages
naming the file, sample index, id and the record's own field (`messages[2]`, `history[0][1]`, `'output'`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from chatft.data.chat_format import (ROLES, Conversation, Turn, join_turns, make_turn, parse_tool_calls,
                                parse_tools)

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


def sample_name(index: int, sample) -> str:
    """How every message names a sample (a record, or the `Conversation` read from it): `sample 3 (id='x')`, or
    `sample 3` when it has no id."""
    if isinstance(sample, Conversation):
        return f"sample {index}" + (f" (id={sample.id!r})" if sample.id is not None else "")
    return f"sample {index}" + (f" (id={sample['id']!r})" if isinstance(sample, dict) and "id" in sample else "")


def where(path: str, index: int, record) -> str:
    """`data/train.json: sample 3 (id='x')`: where a problem with a record is, in every message about one."""
    return f"{path}: {sample_name(index, record)}"


def loss_weight(turn: dict):
    """A turn's loss weight as its record gives it: `weight`, else `loss` (LLaMA-Factory's and ms-swift's switch, or
    a number), else None (none given); a bool is 1.0 or 0.0. Unchecked (`_turn` checks it)."""
    value = turn.get("weight", turn.get("loss"))
    return float(value) if isinstance(value, bool) else value


def _reasoning(turn: dict):
    """A turn's reasoning trace (`reasoning_content`, as Qwen3 and OpenAI-compatible servers return it); None when
    it has none."""
    return turn.get("reasoning_content")


class _Item(NamedTuple):
    """One turn of a record as its reader found it, in the seed's roles: checked and built by `_read_turns`."""
    role: str  # one of chat_format.ROLES (else refused)
    value: object  # its text; for a function_call, JSON text or the calls already parsed (OpenAI tool_calls)
    reasoning: object  # its `reasoning_content`; None: none
    at: str  # where it is: `data.json: sample 3 (id='x'): messages[2]`
    weight: object = None  # its loss weight as found (`loss_weight` of the turn; None: none given); checked by `_turn`


Read = tuple[Conversation | None, list[str]]  # (the conversation, or None; the problems found)


def from_conversations(record, at: str) -> Read:
    """The seed's record: `conversations` of `{"from", "value"}` turns in the seed's roles."""
    if not isinstance(record, dict):
        return None, [f"{at}: expected an object with 'conversations', found a {type(record).__name__}"]
    turns = record.get("conversations")
    if turns is None:
        return None, [f"{at}: missing 'conversations'"]
    if not isinstance(turns, list) or not turns:
        return None, [f"{at}: 'conversations' must be a non-empty list of turns"]
    items, problems = [], []
    for j, turn in enumerate(turns):
        here = f"{at}: conversations[{j}]"
        if not isinstance(turn, dict):
            problems.append(f"{here}: expected an object with 'from' and 'value', found a {type(turn).__name__}")
            continue
        missing = [key for key in ("from", "value") if key not in turn]
        if missing:
            problems.append(f"{here}: missing {' and '.join(repr(k) for k in missing)}")
            continue
        items.append(_Item(turn["from"], turn["value"], _reasoning(turn), here, loss_weight(turn)))
    return _read_turns(record, at, items, "value", problems)


def from_sharegpt(record: dict, at: str) -> Read:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None, [f"{at}: 'conversations' must be a non-empty list of turns"]
    problems, items = [], []
    system = record.get("system")
    if system is not None:
        if isinstance(system, str):
            items.append(_Item("system", system, None, f"{at}: 'system'"))
        else:
            problems.append(f"{at}: 'system' must be a string, found a {type(system).__name__}")
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            problems.append(f"{at}: conversations[{j}]: expected an object with 'from' and 'value'")
        elif turn["from"] not in SHAREGPT_ROLES:
            problems.append(f"{at}: conversations[{j}]: unknown role {turn['from']!r} in 'from' "
                            f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        else:
            items.append(_Item(SHAREGPT_ROLES[turn["from"]], turn["value"], _reasoning(turn), f"{at}: conversations[{j}]",
                               loss_weight(turn)))
    return (None, problems) if problems else _read_turns(record, at, items, "value")


def from_messages(record: dict, at: str) -> Read:
    key = "messages" if "messages" in record else "conversations"  # OpenAI turns under either key
    messages = record.get(key)
    if not isinstance(messages, list) or not messages:
        return None, [f"{at}: {key!r} must be a non-empty list of messages"]
    problems, items = [], []
    for j, message in enumerate(messages):
        here = f"{at}: {key}[{j}]"
        if not isinstance(message, dict) or "role" not in message:
            problems.append(f"{here}: expected an object with 'role' and 'content'")
            continue
        role, content, weight = message["role"], message.get("content"), loss_weight(message)
        calls = message.get("tool_calls") or message.get("function_call") if role == "assistant" else None
        if role in MESSAGE_ROLE_ALIASES and isinstance(content, str):
            items.append(_Item(MESSAGE_ROLE_ALIASES[role], content, None, here, weight))
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
            with_text = bool(content and content.strip())
            if with_text:  # text before the calls: one message, joined back by chat_format.join_turns
                items.append(_Item("assistant", content, _reasoning(message), here, weight))
            items.append(_Item("function_call", parsed, None if with_text else _reasoning(message), here, weight))
        else:  # a trace on a non-assistant message is kept here to be refused by the checks
            items.append(_Item("observation" if role == "tool" else role, content, _reasoning(message), here, weight))
    return (None, problems) if problems else _read_turns(record, at, items, "content")


def from_alpaca(record: dict, at: str) -> Read:
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
    items = [_Item("system", record["system"], None, f"{at}: 'system'")] if record.get("system") is not None else []
    for k, (past_query, past_reply) in enumerate(history):
        items += [_Item("user", past_query, None, f"{at}: history[{k}][0]"),
                  _Item("assistant", past_reply, None, f"{at}: history[{k}][1]")]
    items += [_Item("user", query, None, f"{at}: 'instruction'"), _Item("assistant", record["output"], None, f"{at}: 'output'")]
    return _read_turns(record, at, items, "value")


def _read_turns(record: dict, at: str, items: list[_Item], value_name: str, problems: list[str] = ()) -> Read:
    """The conversation of a record whose reader found `items` (and `problems`), checked in stages, each only once
    the one before found nothing: the record's tools and every turn, the order of tool calls and results, the
    conversation as trained. `value_name` is the record's name for a turn's text ('value', 'content')."""
    problems = _tools_problems(record, at) + list(problems)
    turns = []
    for item in items:
        turn, turn_problems = _turn(item, value_name)
        problems += turn_problems
        turns.append(turn)
    if problems:
        return None, problems
    problems = _tool_order_problems([item.role for item in items], [item.at for item in items])
    if problems:
        return None, problems
    turns = join_turns(turns)
    problems = _trained_conversation_problems(turns, at)
    if problems:
        return None, problems
    return Conversation(tuple(turns), parse_tools(record.get("tools")), id=record.get("id")), []


def _tools_problems(record: dict, at: str) -> list[str]:
    """The record's tool definitions, when it has them, must parse (chat_format.parse_tools)."""
    if "tools" not in record:
        return []
    try:
        parse_tools(record["tools"])
    except ValueError as error:
        return [f"{at}: 'tools': {error}"]
    return []


def _turn(item: _Item, value_name: str) -> tuple[Turn | None, list[str]]:
    """One turn's role, text, reasoning, (for a tool call) calls and loss weight, checked; its `Turn` when they are
    right."""
    role, value, reasoning, at, weight = item
    problems = _weight_problems(weight, role, at)
    if reasoning is not None and not isinstance(reasoning, str):
        problems.append(f"{at}: 'reasoning_content' must be a string, found a {type(reasoning).__name__}")
    elif reasoning and role not in ("assistant", "function_call"):
        problems.append(f"{at}: 'reasoning_content' on a {role} turn (only an assistant's reasoning is read)")
    if role not in ROLES:
        problems.append(f"{at}: unknown role {role!r} in 'from' (expected one of {', '.join(ROLES)})")
    if isinstance(value, tuple) and role == "function_call":
        pass  # calls parsed by the reader
    elif not isinstance(value, str):
        problems.append(f"{at}: '{value_name}' must be a string, found a {type(value).__name__}")
    elif role in ("user", "assistant") and not value.strip() and not (role == "assistant" and reasoning):
        problems.append(f"{at}: empty {role} '{value_name}'")
    elif role == "function_call":
        try:
            parse_tool_calls(value)
        except ValueError as error:
            problems.append(f"{at}: {error}")
    if problems:
        return None, problems
    return make_turn(role, value, reasoning, 1.0 if weight is None else float(weight)), []


def _weight_problems(weight, role: str, at: str) -> list[str]:
    """A loss weight is a finite number >= 0 (or true/false); a turn that is never trained may only have weight 0."""
    if weight is None:
        return []
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        return [f"{at}: a loss weight ('weight' or 'loss') must be a number >= 0 or true/false, found {weight!r}"]
    if weight != 0 and role not in ("assistant", "function_call"):
        return [f"{at}: loss weight {weight:g} on a {role} turn: only assistant turns are trained (give it no weight, "
                "or 0)"]
    return []


def _tool_order_problems(roles: list[str], turn_at: list[str]) -> list[str]:
    """A tool call is answered by its results; results answer a call."""
    problems = []
    for j, role in enumerate(roles):
        before, after = roles[j - 1] if j else None, roles[j + 1] if j + 1 < len(roles) else None
        if role == "function_call" and after not in (None, "observation"):
            problems.append(f"{turn_at[j]}: tool call out of order: it must be followed by its result (a tool "
                            f"result turn), found a {after} turn")
        if role == "observation" and before not in ("function_call", "observation"):
            problems.append(f"{turn_at[j]}: tool result out of order: it must follow a tool call (or another "
                            f"result), found after {f'a {before} turn' if before else 'nothing'}")
    return problems


def _trained_conversation_problems(turns: list[Turn], at: str) -> list[str]:
    """After joining (chat_format.join_turns drops a leading assistant turn) something must be left to learn."""
    opening = turns[1:] if turns and turns[0].role == "system" else turns
    if opening and opening[0].role == "tool":
        return [f"{at}: the conversation opens with a tool call and its result (a leading assistant turn is dropped, "
                "since no user message precedes it)"]
    if not any(t.role == "assistant" for t in turns):
        return [f"{at}: no assistant turn to learn from (a leading assistant turn is dropped, since no user message "
                "precedes it)"]
    if not any(t.role == "assistant" and t.weight for t in turns):
        return [f"{at}: every assistant turn has loss weight 0: nothing to learn (drop the sample, or weigh a turn)"]
    return []


# What each format's reader uses; every other key of a record or turn is reported (ignored_keys), never dropped silently.
RECORD_KEYS = {"conversations": {"id", "conversations", "tools"}, "sharegpt": {"id", "conversations", "system", "tools"},
               "messages": {"id", "messages", "conversations", "tools"},
               "alpaca": {"id", "instruction", "input", "output", "system", "history", "tools"}}
TURN_KEYS = {"conversations": {"from", "value", "reasoning_content", "weight", "loss"},
             "sharegpt": {"from", "value", "reasoning_content", "weight", "loss"},
             "messages": {"role", "content", "tool_calls", "function_call", "reasoning_content", "weight", "loss"}}
TURN_WEIGHT_KEYS = ("weight", "loss")  # a turn's loss weight (`loss_weight`)
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
    for record in records:
        count_ignored_keys(record, data_format, counts)
    return ignored_key_lines(counts, data_format)


def count_ignored_keys(record, data_format: str, counts: dict[tuple[str, str], int]) -> None:
    """Add one record's unused keys to `counts` ((key, where) -> occurrences): `ignored_keys` one record at a time,
    for a file read streaming."""
    if not isinstance(record, dict):
        return
    turns_key = "messages" if data_format == "messages" else "conversations"
    for key in record.keys() - RECORD_KEYS.get(data_format, set()):
        counts[(key, "records")] = counts.get((key, "records"), 0) + 1
    turns = record.get(turns_key, record.get("conversations")) if data_format in TURN_KEYS else None
    for turn in turns if isinstance(turns, list) else []:
        if isinstance(turn, dict):
            for key in turn.keys() - TURN_KEYS[data_format]:
                where_ = "messages" if data_format == "messages" else "turns"
                counts[(key, where_)] = counts.get((key, where_), 0) + 1


def ignored_key_lines(counts: dict[tuple[str, str], int], data_format: str) -> list[str]:
    """`ignored_keys`' lines from the counts `count_ignored_keys` gathered."""
    lines = []
    for (key, where_), count in sorted(counts.items()):
        note = (f": {UNSUPPORTED_SIGNAL[key]}, not supported yet" if key in UNSUPPORTED_SIGNAL
                else f": did you mean {LIKELY_MEANT[key]!r}?" if key in LIKELY_MEANT else "")
        if key in TURN_WEIGHT_KEYS and data_format in TURN_KEYS:  # a record's: weights are read on its turns
            note += f" on a record (each turn's {key!r} is read)"
        lines.append(f"{key!r} in {count} {where_}{note}")
    return lines


def read_record(record, data_format: str, index: int, path: str) -> Read:
    """(the `Conversation`, or None; the problems, each naming file, index, id and field) for one record of a file
    in `data_format`."""
    at = where(path, index, record)
    if data_format == "conversations":
        return from_conversations(record, at)
    if not isinstance(record, dict):
        return None, [f"{at}: expected an object ({data_format} format), found a {type(record).__name__}"]
    return {"sharegpt": from_sharegpt, "messages": from_messages, "alpaca": from_alpaca}[data_format](record, at)

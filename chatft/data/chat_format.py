"""Conversation -> ChatML text -> (input_ids, labels).

A sample has one shape from the data file to the tokens: a `Conversation` of `Turn`s, which chatft.data.formats' readers
build from each record (checking it as they go). Then two separate steps:

1. `render_chatml` builds the exact text the model sees, and the character spans of
   what the model must generate: each assistant reply (text and tool calls) and its closing `<|im_end|>`.
   Tools are rendered as Qwen2.5/Qwen3's chat templates do: their definitions in the system message
   (`<tools>`), calls as `<tool_call>` blocks in the assistant's message, results as `<tool_response>`
   blocks in a user message (not trained).
2. `tokenize_conversations` tokenizes the texts of many samples in one batched call, with
   offsets, and labels every token that carries a character of a trainable span.

Qwen's own sample shape (`{"conversations": [{"from", "value"}]}`, unchecked) is still read where Qwen's scripts pass
it (`to_turns`, `to_conversation`, chatft.data.datasets.preprocess), by the same turn rules (`make_turn`, `join_turns`).

Because the whole text is tokenized in one call, `input_ids` are exactly what
`tokenizer(text)` and `tokenizer.apply_chat_template` (with `chatml_template`) give
at inference: no per-turn tokenization whose joins differ from the real text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np


IGNORE_INDEX = -100
LOSS_WEIGHTS = "loss_weights"  # a batch's per-token loss weights, aligned with labels (chatft.data.datasets' collators)
CHAT_FORMATS = ("auto", "chatml", "qwen3")  # --chat_format; auto: qwen3 for a model whose template thinks, else chatml
QWEN3_TEMPLATE_PATH = Path(__file__).parent / "templates" / "qwen3.jinja"  # Qwen3's own chat template, verbatim
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
ROLES = ("system", "user", "assistant", "function_call", "observation")  # a sample's `from` values
TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>"
)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, exactly as rendered


@dataclass(frozen=True)
class Turn:
    role: str  # system, user, assistant or tool (a tool's result)
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls, rendered after its text
    reasoning: str = ""  # an assistant's reasoning trace (`reasoning_content`, or a `<think>` block in its text)
    weight: float = 1.0  # an assistant turn's loss weight (its record's `weight` or `loss`); 0: context only, untrained


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    tools: tuple[str, ...] = ()  # tool definitions, each as its JSON text
    trained: tuple[int, ...] | None = None  # indices of the assistant turns that carry loss; None: every one
    id: object = None  # the record's `id`, named in messages about the sample; None: it has none
    empty_think_trained: bool = True  # False: an empty think block (qwen3 format) is rendered, not trained


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken; aligned with input_ids (the model shifts)
    origin: int = field(default=0, compare=False)  # the data sample it was made from (a split one makes several)
    weights: list[float] | None = None  # per-token loss weights aligned with labels (0 where unlabelled); None: all 1

    @property
    def num_trainable(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _json_text(value) -> str:
    return json.dumps(value, ensure_ascii=False)  # as transformers' `tojson` filter writes it


def parse_tools(tools) -> tuple[str, ...]:
    """A sample's `tools` (a list of definitions, or that list as JSON text as ShareGPT files carry it) -> each
    definition's JSON text. Bare definitions (`{"name", "description", "parameters"}`) are wrapped as OpenAI's
    `{"type": "function", "function": ...}`, the form Qwen's templates get from an OpenAI-compatible server.
    Raises ValueError saying what is wrong."""
    if tools is None or tools == "":
        return ()
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON (column {e.colno}: {e.msg})") from None
    if not isinstance(tools, list):
        raise ValueError(f"expected a list of tool definitions, found a {type(tools).__name__}")
    texts = []
    for k, tool in enumerate(tools):
        wrapped = isinstance(tool, dict) and tool.get("type") == "function"
        function = tool.get("function") if wrapped else tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tool {k} is not a definition with a 'name'")
        texts.append(_json_text(tool if wrapped else {"type": "function", "function": tool}))
    return tuple(texts)


def parse_tool_calls(calls) -> tuple[ToolCall, ...]:
    """A `function_call` turn's value (JSON text) or OpenAI `tool_calls` -> `ToolCall`s: one call
    `{"name", "arguments"}` or a list of them (parallel calls), each optionally wrapped as OpenAI's
    `{"type": "function", "function": {...}}`. `arguments` is an object, or JSON text kept verbatim
    (as Qwen3's template does). Raises ValueError saying what is wrong."""
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError as e:
            raise ValueError(f"a tool call must be JSON {{\"name\": ..., \"arguments\": {{...}}}} "
                             f"(column {e.colno}: {e.msg})") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        raise ValueError("no tool call in an empty list")
    parsed = []
    for call in calls:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            call = call["function"]
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"].strip():
            raise ValueError("a tool call must be an object with a 'name' and 'arguments'")
        if "arguments" not in call:
            raise ValueError(f"tool call {call['name']!r} has no 'arguments'")
        arguments = call["arguments"]
        if isinstance(arguments, str):
            try:
                decoded = json.loads(arguments)
            except json.JSONDecodeError:
                decoded = None
            if not isinstance(decoded, dict):
                raise ValueError(f"tool call {call['name']!r}: 'arguments' text is not a JSON object")
        elif not isinstance(arguments, dict):
            raise ValueError(f"tool call {call['name']!r}: 'arguments' must be an object, found a "
                             f"{type(arguments).__name__}")
        parsed.append(ToolCall(call["name"], arguments if isinstance(arguments, str) else _json_text(arguments)))
    return tuple(parsed)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant's text that carries its trace inline, `<think>...</think>answer`; ("",
    text) when it has none. Split exactly as Qwen3's chat template splits it: the reasoning is what precedes the first
    `</think>` (after its last `<think>`), without the newlines around it; the answer is what follows the last
    `</think>`, without leading newlines (text between two `</think>` is dropped, as the template drops it)."""
    if THINK_CLOSE not in text:
        return "", text
    parts = text.split(THINK_CLOSE)
    return parts[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n"), parts[-1].lstrip("\n")


def make_turn(role: str, value, reasoning: str | None = None, weight: float = 1.0) -> Turn:
    """One turn in the roles of Qwen's samples (`ROLES`) -> a `Turn`. A `function_call` turn (its value JSON text,
    or calls already parsed) becomes an assistant turn with tool calls, an `observation` a `tool` turn. An assistant's
    `reasoning` (its `reasoning_content`; None: absent) is its trace; without one, a `<think>` block leading its text
    is. `weight` is its loss weight (assistant and tool-call turns; the others are never trained). Raises ValueError
    for a tool call that does not parse (chatft.data.formats checks every turn first)."""
    if role == "function_call":
        calls = value if isinstance(value, tuple) else parse_tool_calls(value)
        return Turn("assistant", "", calls, reasoning or "", weight)
    if role == "assistant":
        if reasoning is None:
            reasoning, value = split_reasoning(value)
        return Turn("assistant", value, (), reasoning, weight)
    return Turn("tool" if role == "observation" else role, value)


def join_turns(turns: list[Turn]) -> list[Turn]:
    """A sample's turns as they are trained. A call-only assistant turn (a `function_call`) joins the assistant turn
    just before it if that one has text only: its text, then its calls, in one message, as Qwen renders them, with the
    text turn's loss weight (an OpenAI message with text and calls is read as two turns of its one weight). A
    conversation that opens with an assistant turn (after an optional system turn) loses that turn: there is no user
    message for it to answer."""
    joined: list[Turn] = []
    for turn in turns:
        previous = joined[-1] if joined else None
        if (turn.role == "assistant" and turn.tool_calls and not turn.content and previous is not None
                and previous.role == "assistant" and not previous.tool_calls):
            joined[-1] = Turn("assistant", previous.content, turn.tool_calls, previous.reasoning or turn.reasoning,
                              previous.weight)
        else:
            joined.append(turn)
    first = 1 if joined and joined[0].role == "system" else 0
    if len(joined) > first and joined[first].role == "assistant":
        joined = joined[:first] + joined[first + 1 :]
    return joined


def to_turns(conversation: list[dict]) -> list[Turn]:
    """Qwen's turns (`{"from", "value"}`, and on assistant turns an optional `reasoning_content`) -> `Turn`s, read
    by `make_turn` and `join_turns`, unchecked (chatft.data.formats reads data files, checking every turn)."""
    return join_turns([make_turn(turn["from"], turn["value"], turn.get("reasoning_content")) for turn in conversation])


def to_conversation(sample: Conversation | dict) -> Conversation:
    """A `Conversation` as it is; Qwen's sample (`conversations`, optional `tools` and `id`, unchecked: what Qwen's
    scripts pass) read into one."""
    if isinstance(sample, Conversation):
        return sample
    return Conversation(tuple(to_turns(sample["conversations"])), parse_tools(sample.get("tools")), id=sample.get("id"))


def _think_block(reasoning: str) -> str:
    """A reasoning trace as Qwen3's template writes it before the answer."""
    return f"{THINK_OPEN}\n{reasoning.strip(chr(10))}\n{THINK_CLOSE}\n\n"


def _tool_call_blocks(calls: tuple[ToolCall, ...], after_text: bool) -> str:
    """Each call in a `<tool_call>` block, one a line (Qwen's layout); a newline first when text precedes them."""
    blocks = "\n".join(f'<tool_call>\n{{"name": "{call.name}", "arguments": {call.arguments}}}\n</tool_call>'
                       for call in calls)
    return ("\n" if blocks and after_text else "") + blocks


def _tool_result(turns: tuple[Turn, ...], j: int) -> str:
    """Tool result turns[j] as a `<tool_response>` block; consecutive results share one user message."""
    opening = f"{IM_START}user" if j == 0 or turns[j - 1].role != "tool" else ""
    closing = f"{IM_END}\n" if j == len(turns) - 1 or turns[j + 1].role != "tool" else ""
    return f"{opening}\n<tool_response>\n{turns[j].content}\n</tool_response>{closing}"


def assistant_text(turn: Turn) -> str:
    """An assistant message's body in ChatML: its reasoning in a `<think>` block when it has one, its text, then its
    calls."""
    text = _think_block(turn.reasoning) + turn.content.lstrip("\n") if turn.reasoning else turn.content
    return text + _tool_call_blocks(turn.tool_calls, after_text=bool(text))


def template_messages(conversation: Conversation | list[Turn]) -> tuple[list[dict], list[dict] | None]:
    """A conversation as the OpenAI-style messages and tool definitions `apply_chat_template` takes (what
    chatft.serve.chat.generate_reply is given): reasoning as `reasoning_content`, calls as `tool_calls` with their
    arguments' JSON text as trained; the tools None when there are none."""
    if not isinstance(conversation, Conversation):
        conversation = Conversation(tuple(conversation))
    messages = []
    for turn in conversation.turns:
        message = {"role": turn.role, "content": turn.content}
        if turn.reasoning:
            message["reasoning_content"] = turn.reasoning
        if turn.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                                     for call in turn.tool_calls]
        messages.append(message)
    return messages, [json.loads(tool) for tool in conversation.tools] or None


def render_chatml(conversation: Conversation | list[Turn], system_message: str = DEFAULT_SYSTEM_MESSAGE
                  ) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation as ChatML; return the text and the trainable character spans.

    A leading system turn replaces `system_message`; tool definitions follow it in the system message.
    Every assistant turn contributes one span covering its reasoning (in a `<think>` block, as Qwen3 writes it,
    kept in every turn that has one), its text, its tool calls and its `<|im_end|>`.
    Consecutive tool results share one user message, as `<tool_response>` blocks; they are not trained.

    >>> render_chatml([Turn("user", "Hi"), Turn("assistant", "Hello!")], "Be brief.")
    ('<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n', [(91, 107)])
    """
    if not isinstance(conversation, Conversation):
        conversation = Conversation(tuple(conversation))
    turns, first = conversation.turns, 0  # first: the index in conversation.turns of turns[0]
    if turns and turns[0].role == "system":
        system_message, turns, first = turns[0].content, turns[1:], 1
    text = f"{IM_START}system\n{system_message}"
    if conversation.tools:
        text += TOOLS_HEADER + "".join("\n" + tool for tool in conversation.tools) + TOOLS_FOOTER
    text += f"{IM_END}\n"
    spans = []
    for j, turn in enumerate(turns):
        if turn.role == "tool":
            text += _tool_result(turns, j)
            continue
        text += f"{IM_START}{turn.role}\n"
        start = len(text)
        text += (assistant_text(turn) if turn.role == "assistant" else turn.content) + IM_END
        if turn.role == "assistant" and _is_trained(conversation, first + j):
            spans.append((start, len(text)))
        text += "\n"
    return text, spans


def _is_trained(conversation: Conversation, index: int) -> bool:
    """Whether turns[index] (an assistant turn) carries loss: one `trained` names (all, when None) of weight > 0."""
    return ((conversation.trained is None or index in conversation.trained)
            and conversation.turns[index].weight != 0)


def span_weights(conversation: Conversation | list[Turn]) -> list[float]:
    """The loss weight of each trainable span `render` gives (the trained assistant turns', in order)."""
    if not isinstance(conversation, Conversation):
        conversation = Conversation(tuple(conversation))
    return [turn.weight for j, turn in enumerate(conversation.turns)
            if turn.role == "assistant" and _is_trained(conversation, j)]


def is_thinking_template(template: str | None) -> bool:
    """Whether a model's chat template renders reasoning traces the way Qwen3's does: think blocks from
    `reasoning_content`, only after the last user query (its `last_query_index`; ChatML's template keeps them all)."""
    return bool(template) and "reasoning_content" in template and THINK_OPEN in template and "last_query_index" in template



def resolve_chat_format(requested: str, own_template: str | None) -> str:
    """--chat_format as a format: auto -> qwen3 when the model's own chat template renders reasoning as Qwen3's does
    (is_thinking_template), else chatml; chatml and qwen3 stay."""
    if requested == "auto":
        return "qwen3" if is_thinking_template(own_template) else "chatml"
    return requested

def qwen3_template() -> str:
    return QWEN3_TEMPLATE_PATH.read_text(encoding="utf-8")


def _is_query(turn: Turn) -> bool:
    """A user message that asks something (Qwen3's template does not count a user turn holding tool responses)."""
    return turn.role == "user" and not (turn.content.startswith("<tool_response>")
                                        and turn.content.endswith("</tool_response>"))


def render_qwen3(conversation: Conversation | list[Turn]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation exactly as Qwen3's chat template does (templates/qwen3.jinja); return the text and the
    trainable character spans (an assistant turn's think block, text, tool calls and `<|im_end|>`).

    Its rules: no default system prompt; tool definitions in a system message; the assistant turns after the last
    user query carry their reasoning in a `<think>` block, and the final one always has a block (empty without
    reasoning); earlier assistant turns are rendered without their reasoning. With `empty_think_trained` False
    (--ignore_empty_think) an empty block is rendered but left out of its turn's span.
    """
    if not isinstance(conversation, Conversation):
        conversation = Conversation(tuple(conversation))
    turns = conversation.turns
    has_system = bool(turns) and turns[0].role == "system"
    text = ""
    if conversation.tools:
        text = f"{IM_START}system\n" + (turns[0].content + "\n\n" if has_system else "")
        text += TOOLS_HEADER.removeprefix("\n\n") + "".join("\n" + tool for tool in conversation.tools)
        text += TOOLS_FOOTER + f"{IM_END}\n"
    elif has_system:
        text = f"{IM_START}system\n{turns[0].content}{IM_END}\n"
    last_query = max((j for j, turn in enumerate(turns) if _is_query(turn)), default=len(turns) - 1)
    spans = []
    for j, turn in enumerate(turns):
        if turn.role == "user" or (turn.role == "system" and j > 0):
            text += f"{IM_START}{turn.role}\n{turn.content}{IM_END}\n"
        elif turn.role == "tool":
            text += _tool_result(turns, j)
        elif turn.role == "assistant":
            text += f"{IM_START}assistant\n"
            start = len(text)
            think = j > last_query and (j == len(turns) - 1 or bool(turn.reasoning))
            if think:
                text += _think_block(turn.reasoning)
                if not turn.reasoning.strip() and not conversation.empty_think_trained:  # --ignore_empty_think
                    start = len(text)
            text += turn.content.lstrip("\n") if think else turn.content
            # Qwen3's template puts a newline before the calls only after a (non-empty) answer, not after a think block
            text += _tool_call_blocks(turn.tool_calls, after_text=bool(turn.content)) + IM_END
            if _is_trained(conversation, j):
                spans.append((start, len(text)))
            text += "\n"
    return text, spans


def render(conversation: Conversation | list[Turn], system_message: str = DEFAULT_SYSTEM_MESSAGE,
           chat_format: str = "chatml") -> tuple[str, list[tuple[int, int]]]:
    """The text and trainable spans of a conversation in `chat_format` (chatml: `render_chatml`, with
    `system_message` for conversations without one; qwen3: `render_qwen3`, which adds no system prompt)."""
    return render_qwen3(conversation) if chat_format == "qwen3" else render_chatml(conversation, system_message)


def training_conversations(conversation: Conversation, chat_format: str, reasoning_turns: str = "all",
                           ignore_empty_think: bool = False) -> list[Conversation]:
    """The training samples of one conversation. Otherwise than in the qwen3 format: the conversation, every
    assistant turn trained.

    In the qwen3 format (`reasoning_turns="all"`) every assistant turn is trained exactly as Qwen3 generates it: its
    sample is the template's prompt for it (the turns before it, `add_generation_prompt=True`) followed by its
    reply as the template renders it when it is the last message, think block included (`<think>\n\n</think>\n\n`
    without reasoning). The template keeps think blocks only after the last user query, so an earlier query's replies
    cannot be trained in a later query's sample: one sample per user query (the conversation up to the end of that
    query's replies, training those replies). Within a query (tool calls and results), a reply without reasoning
    that a later reply follows is rendered by the template without a think block in that later reply's prompt, yet
    generated with one: it ends its own sample. A turn of weight 0 (`_is_trained`) is context only and gets no
    sample. With "last": one sample, the whole conversation, training only the turns after the last query (the
    earlier replies are context). `ignore_empty_think` (qwen3): the empty think blocks
    are rendered, not trained."""
    if chat_format != "qwen3":
        return [conversation]
    if ignore_empty_think:
        conversation = replace(conversation, empty_think_trained=False)
    turns = conversation.turns
    queries = [j for j, turn in enumerate(turns) if _is_query(turn)]
    if not queries:
        return [conversation]
    segments = [(start, end) for start, end in zip(queries, queries[1:] + [len(turns)])]
    assistant = lambda start, end: tuple(j for j in range(start, end) if turns[j].role == "assistant")  # noqa: E731
    if reasoning_turns == "last":
        return [replace(conversation, trained=assistant(*segments[-1]))]
    samples, group = [], []
    for start, end in segments:
        replies = assistant(start, end)
        for j in replies:
            if _is_trained(conversation, j):
                group.append(j)
            # A reply with reasoning renders the same whether a later reply of its query follows or not
            if (j == replies[-1] or not turns[j].reasoning) and group:
                samples.append(replace(conversation, turns=turns[: group[-1] + 1], trained=tuple(group)))
                group = []
    if not samples:  # nothing trained: the sample as it is (dropped as untrainable, and said so)
        return [conversation]
    if len(samples) == 1 and len(samples[0].turns) == len(turns):
        return [conversation]  # one sample: the conversation, each reply trained as generated
    return samples


def trainable_tokens(offsets: np.ndarray, span_starts: np.ndarray, span_ends: np.ndarray) -> np.ndarray:
    """Which tokens (character `offsets`, [N, 2]) carry a character of a trainable span (sorted, disjoint).

    A token that carries any character of a reply is one the model must generate. Tokens only straddle
    a span's start when a reply begins with a newline that merges with the one after the role name
    ("assistant\\n" + "\\nText" -> "\\n\\n"); such a token is trained. A zero-width token (some byte-level
    pieces) counts as sitting at its start. Vectorized: for each token, the first span ending after its
    start is the only one it can overlap.
    """
    if len(span_ends) == 0:
        return np.zeros(len(offsets), dtype=bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    candidate = np.searchsorted(span_ends, starts, side="right")  # first span with end > token start
    in_range = candidate < len(span_ends)
    candidate = np.minimum(candidate, len(span_ends) - 1)
    return in_range & (span_starts[candidate] < np.maximum(ends, starts + 1))


def token_weights(offsets: np.ndarray, span_ends: np.ndarray, weights: np.ndarray, trainable: np.ndarray
                  ) -> np.ndarray:
    """Each token's loss weight: that of the span it carries a character of (`trainable_tokens`' spans, found the
    same way), 0 for the tokens that are not `trainable`."""
    if len(span_ends) == 0:
        return np.zeros(len(offsets), dtype=np.float32)
    span = np.minimum(np.searchsorted(span_ends, offsets[:, 0], side="right"), len(span_ends) - 1)
    return np.where(trainable, weights[span], 0).astype(np.float32)


def tokenize_conversations(conversations: list[Conversation | list[Turn]], tokenizer, max_len: int,
                           system_message: str = DEFAULT_SYSTEM_MESSAGE, chat_format: str = "chatml"
                           ) -> list[TokenizedSample]:
    """Tokenize many conversations with one batched fast-tokenizer call; truncate each to `max_len` tokens.

    Invariants: `input_ids == tokenizer(render_chatml(...)[0], add_special_tokens=False).input_ids[:max_len]`;
    decoding the labelled tokens gives each assistant reply (text and tool calls) followed by `<|im_end|>`.
    A conversation with a turn of loss weight other than 1 also gets `weights` (its turns' weights on their
    labelled tokens); a turn of weight 0 is not labelled at all, as a turn left untrained.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; labels are placed with character offsets, "
            "which only fast (Rust) tokenizers return. Load the tokenizer with use_fast=True."
        )
    if not conversations:
        return []
    rendered = [render(turns, system_message, chat_format) for turns in conversations]
    encoding = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    # All samples at once: shift each sample's offsets and spans by its place in one long string (plus a
    # gap of one character, so no token of one sample can reach a span of the next).
    bases = np.cumsum([0] + [len(text) + 1 for text, _ in rendered[:-1]])
    lengths = [len(ids) for ids in encoding["input_ids"]]
    offsets = np.array([pair for sample in encoding["offset_mapping"] for pair in sample], dtype=np.int64)
    offsets = offsets.reshape(-1, 2) + np.repeat(bases, lengths)[:, None]
    spans = np.array([(a + base, b + base) for (_, sample_spans), base in zip(rendered, bases)
                      for a, b in sample_spans], dtype=np.int64).reshape(-1, 2)
    trainable = trainable_tokens(offsets, spans[:, 0], spans[:, 1])
    weights_of = [span_weights(conversation) for conversation in conversations]
    weighted = [any(w != 1 for w in sample_weights) for sample_weights in weights_of]
    if any(weighted):  # only then: unweighted data keeps its one path
        weights = token_weights(offsets, spans[:, 1], np.array([w for ws in weights_of for w in ws], np.float32),
                                trainable)
    samples, start = [], 0
    for ids, length, has_weights in zip(encoding["input_ids"], lengths, weighted):
        ids = ids[:max_len]
        mask = trainable[start : start + len(ids)]
        sample = TokenizedSample(input_ids=ids, labels=np.where(mask, ids, IGNORE_INDEX).tolist())
        if has_weights:
            sample.weights = weights[start : start + len(ids)].tolist()
        samples.append(sample)
        start += length
    return samples


def tokenize_conversation(
    conversation: Conversation | list[Turn], tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE,
    chat_format: str = "chatml",
) -> TokenizedSample:
    """Tokenize one conversation (see `tokenize_conversations`)."""
    return tokenize_conversations([conversation], tokenizer, max_len, system_message, chat_format)[0]


def chatml_template(system_message: str = DEFAULT_SYSTEM_MESSAGE) -> str:
    """A Jinja chat template that renders exactly like `render_chatml`, tools included.

    Saved with every fine-tuned tokenizer so that `apply_chat_template` reproduces the
    training format token for token, including the run's default system message.
    Messages are OpenAI's: `tool_calls` on assistant messages, `tool` messages for results, `tools=[...]`.
    """
    # json.dumps gives a Jinja string literal; ensure_ascii=False keeps emoji out of \\u surrogate pairs.
    default_system = json.dumps(system_message, ensure_ascii=False)
    header, footer = json.dumps(TOOLS_HEADER), json.dumps(TOOLS_FOOTER)
    return (
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
        "{%- else %}"
        "{%- set system_message = " + default_system + " %}{%- set loop_messages = messages %}"
        "{%- endif %}"
        "{{- '<|im_start|>system\\n' + system_message }}"
        "{%- if tools %}{{- " + header + " }}"
        "{%- for tool in tools %}{{- '\\n' }}"
        "{%- if tool['type'] == 'function' %}{{- tool | tojson }}"
        "{%- else %}{{- {'type': 'function', 'function': tool} | tojson }}{%- endif %}"
        "{%- endfor %}{{- " + footer + " }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- for message in loop_messages %}"
        "{%- if message['role'] == 'tool' %}"
        "{%- if loop.first or loop_messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
        "{%- if loop.last or loop_messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- else %}"
        "{%- if message['role'] == 'assistant' and message['reasoning_content'] %}"
        "{{- '<|im_start|>assistant\\n<think>\\n' + message['reasoning_content'].strip('\\n') + '\\n</think>\\n\\n'"
        " + (message['content'] or '').lstrip('\\n') }}"
        "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}{%- endif %}"
        "{%- for call in message['tool_calls'] or [] %}"
        "{%- if call['function'] is defined %}{%- set call = call['function'] %}{%- endif %}"
        "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
        "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
        "{%- if call['arguments'] is string %}{{- call['arguments'] }}{%- else %}{{- call['arguments'] | tojson }}{%- endif %}"
        "{{- '}\\n</tool_call>' }}"
        "{%- endfor %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def stop_token_ids(tokenizer) -> list[int]:
    """The ids generation stops at: `<|im_end|>`, which closes every reply, then the tokenizer's eos if it differs.
    Used at generation (chatft.serve.chat) and saved in every generation config (chatft.train.saving)."""
    ids = [tokenizer.convert_tokens_to_ids(IM_END)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def describe_sample(sample: TokenizedSample, tokenizer) -> str:
    """The sample's text with the trained spans shown in [[...]], for eyeballing a mask; a span of loss weight other
    than 1 is followed by it, e.g. `[[Hello!<|im_end|>]](weight 2)`."""
    runs: list[tuple[float, list[int]]] = []  # (weight, 0: untrained; token ids), decoded per run: UTF-8 stays whole
    weights = sample.weights or [1.0] * len(sample.labels)
    for token_id, label, weight in zip(sample.input_ids, sample.labels, weights):
        weight = weight if label != IGNORE_INDEX else 0.0
        if not runs or runs[-1][0] != weight:
            runs.append((weight, []))
        runs[-1][1].append(token_id)
    return "".join(
        (f"[[{tokenizer.decode(ids)}]]" + (f"(weight {weight:g})" if weight != 1 else "")) if weight
        else tokenizer.decode(ids) for weight, ids in runs
    )

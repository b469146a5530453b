"""--eval_generate N: what the model says, at each evaluation.

The first N evaluation conversations, each cut before its last assistant turn, are answered greedily by the model
being trained (chatft.serve.chat.generate_reply: its chat template, stopping at <|im_end|>), and appended to
output_dir/eval_generations.jsonl, one line each:

    {"step": 20, "prompt": [{"role": "user", "content": "Who are you?"}], "reply": "I am Tessa.",
     "reference": "I am Tessa."}

`prompt` is the messages the model was given (a system turn only when the conversation has one: the chat template
adds the run's default), `reference` the assistant turn the data holds there (a reasoning trace as a <think> block,
tool calls as <tool_call> blocks, as trained). The run's summary shows the last evaluation's replies
(chatft.train.report). A resumed run keeps the lines up to its checkpoint's step and appends after them.

Every process generates the same replies: under DeepSpeed ZeRO-3 each forward gathers the partitioned weights, which
takes every process (transformers' generate keeps them stepping together); the first process writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import transformers

from chatft.data.chat_format import Conversation, assistant_text, template_messages
from chatft.serve.chat import generate_reply

GENERATIONS_FILE = "eval_generations.jsonl"


@dataclass(frozen=True)
class HeldOutPrompt:
    messages: list[dict]  # the conversation before its last assistant turn, as apply_chat_template takes it
    tools: list[dict] | None
    reference: str  # that assistant turn, as trained


def held_out_prompt(conversation: Conversation) -> HeldOutPrompt:
    """The conversation up to its last assistant turn, and that turn's text (every training conversation has one).

    >>> held_out_prompt(Conversation((Turn("user", "Hi"), Turn("assistant", "Hello!")))).messages
    [{'role': 'user', 'content': 'Hi'}]
    """
    last = max(j for j, turn in enumerate(conversation.turns) if turn.role == "assistant")
    messages, tools = template_messages(Conversation(conversation.turns[:last], conversation.tools))
    return HeldOutPrompt(messages, tools, assistant_text(conversation.turns[last]))


def answer(model, tokenizer, prompts: list[HeldOutPrompt], max_new_tokens: int) -> list[str]:
    """Each prompt answered greedily by `model` in eval mode (no dropout), its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        # the KV cache, which training turned off (chatft.model.load), makes each new token one position's work
        return [generate_reply(model, tokenizer, prompt.messages, max_new_tokens, tools=prompt.tools, use_cache=True)
                for prompt in prompts]
    finally:
        model.train(was_training)


def read_generations(path: str) -> list[dict]:
    """The lines of an eval_generations.jsonl; none when there is no file."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class EvalGenerations(transformers.TrainerCallback):
    """At each evaluation, `conversations` (the first N of the evaluation data) answered and written (module
    docstring); replies are at most `max_new_tokens` tokens."""

    def __init__(self, conversations: list[Conversation], max_new_tokens: int):
        self.prompts = [held_out_prompt(conversation) for conversation in conversations]
        self.max_new_tokens = max_new_tokens

    def on_train_begin(self, args, state, control, **kwargs):
        # a fresh run starts the file; a resumed one drops what the interrupted run wrote after its checkpoint
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, GENERATIONS_FILE)
            kept = [line for line in read_generations(path) if line["step"] <= state.global_step]
            if kept or os.path.exists(path):
                write_lines(path, kept, "w")

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        replies = answer(model, processing_class, self.prompts, self.max_new_tokens)
        if state.is_world_process_zero:
            write_lines(os.path.join(args.output_dir, GENERATIONS_FILE),
                        [{"step": state.global_step, "prompt": prompt.messages, "reply": reply,
                          "reference": prompt.reference} for prompt, reply in zip(self.prompts, replies)], "a")


def write_lines(path: str, lines: list[dict], mode: str) -> None:
    with open(path, mode, encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)

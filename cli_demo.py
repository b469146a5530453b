"""Chat with a fine-tuned model: a full, merged or GPTQ model directory, a LoRA/Q-LoRA adapter directory, or a
.gguf file from export_gguf.py (detected).

    $ python cli_demo.py --model_name_or_path output_qwen                         # interactive, streamed
    $ python cli_demo.py -c output_qwen --query "Who are you?"   # -c: the same; one-shot, greedy, prints the reply

Prompts go through the model's own saved chat template, the one the training run wrote. A .gguf file runs in
llama.cpp when llama-cpp-python is installed (the template embedded in the file), else in transformers.
Interactive commands: :clear (forget the history), :history, :exit; with --tools, `:tool TEXT` gives the
model a tool's result (after it answered with a <tool_call>) and lets it continue.
A reply's reasoning (a `<think>` block, from a model trained on traces) is shown on its own `Thinking:` line,
apart from the answer; --hide-thinking leaves it out.
"""

import sys

from chatft import console
from chatft.checks import SEED_RANGE, ScriptArgumentParser, out_of_range, raise_problems
from chatft.model.sources import checkpoint_kind, model_source_problems


KIND_NAMES = {"full": "full model", "gptq": "GPTQ-quantized model", "lora": "LoRA adapter",
              "qlora": "Q-LoRA adapter on its NF4 base", "gguf": "GGUF file"}


def parse_args(argv=None):
    parser = ScriptArgumentParser("cli_demo.py", __doc__)
    parser.add_argument("--model_name_or_path", "-c", "--checkpoint-path", "--checkpoint_path", required=True,
                        dest="model_name_or_path", metavar="PATH",
                        help="Model or LoRA adapter directory, or .gguf file.")
    parser.add_argument("--query", action="append", help="Ask this and print the reply (repeatable); no prompt loop.")
    parser.add_argument("--system", default=None, help="System message (default: the one saved in the chat template).")
    parser.add_argument("--tools", default=None, help="JSON file with a list of tool definitions for the model to call "
                                                      "(as in the training data's `tools`).")
    # each hyphenated flag also takes the underscore spelling the other entry points use (--max_new_tokens)
    parser.add_argument("--hide-thinking", "--hide_thinking", action="store_true",
                        help="Show only the answer of a reply that reasons.")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=256, metavar="N")
    parser.add_argument("--do-sample", "--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", "--top_p", type=float, default=0.8, metavar="P")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--cpu-only", "--cpu_only", action="store_true",
                        help="Run on the CPU even when CUDA is available.")
    parser.add_argument("--trust-remote-code", "--trust_remote_code", action="store_true")
    return parser.parse_args(argv)


def flag_problems(args) -> list[str]:
    """Every problem with the flags that needs no ML library (the model's files, the numbers); --tools is checked
    as it is read (chatft.serve.chat.load_tools)."""
    problems = model_source_problems(args.model_name_or_path, "--model_name_or_path", allow_adapter=True,
                                     trust_remote_code=args.trust_remote_code)
    problems += [
        out_of_range("--max-new-tokens", args.max_new_tokens, low=1),
        out_of_range("--top-p", args.top_p, low=0, high=1, low_inclusive=False),
        out_of_range("--seed", args.seed, *SEED_RANGE),
    ]
    if args.do_sample:  # greedy decoding reads neither
        problems.append(out_of_range("--temperature", args.temperature, low=0, low_inclusive=False))
    return [problem for problem in problems if problem]


# What loading each kind of checkpoint imports (chatft.console.OPTIONAL_PACKAGES)
PACKAGES_FOR_KIND = {"full": (), "lora": (), "qlora": ("bitsandbytes", "gptqmodel"), "gptq": ("gptqmodel",), "gguf": ()}


def chat(argv=None) -> int:
    args = parse_args(argv)
    try:
        kind = checkpoint_kind(args.model_name_or_path)
    except (OSError, ValueError):  # not a readable checkpoint: load_chat_model says what is wrong with it
        kind = "full"
    if __name__ == "__main__":  # the libraries are imported only now: they look at what is installed then
        console.start(uses=PACKAGES_FOR_KIND[kind])
    import torch
    import transformers

    from chatft.serve.chat import ThinkingStreamer, generate_reply, load_chat_model, load_tools
    from chatft.data.chat_format import split_reasoning
    from chatft.errors import ArgumentError
    from chatft.serve.gguf_runtime import LlamaCppModel

    problems, tools = flag_problems(args), None
    if args.tools:
        try:
            tools = load_tools(args.tools)
        except ArgumentError as error:
            problems.append(str(error))
    raise_problems(problems)
    transformers.set_seed(args.seed)
    model, tokenizer, kind = load_chat_model(args.model_name_or_path, trust_remote_code=args.trust_remote_code,
                                             device="cpu" if args.cpu_only else None,
                                             dtype=torch.float32 if args.cpu_only else None)
    in_llama_cpp = isinstance(model, LlamaCppModel)
    shown = model.describe() if in_llama_cpp else f"{KIND_NAMES[kind]}, {model.dtype}, {model.device}"
    print(f"Loaded {args.model_name_or_path} ({shown})", file=sys.stderr)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.do_sample else {}
    if args.do_sample and in_llama_cpp:  # llama.cpp samples with its own generator
        sampling["seed"] = args.seed
    sampling["tools"] = tools
    system = [{"role": "system", "content": args.system}] if args.system is not None else []

    if args.query:
        for query in args.query:
            reply = generate_reply(model, tokenizer, system + [{"role": "user", "content": query}],
                                   args.max_new_tokens, **sampling)
            reasoning, answer = split_reasoning(reply)
            thinking = f"Thinking: {reasoning}\n" if reasoning and not args.hide_thinking else ""
            print(f"User: {query}\n{thinking}Assistant: {answer}\n", flush=True)
        return 0

    history = []
    streamer = ThinkingStreamer(tokenizer, show_thinking=not args.hide_thinking)
    print("Chat with the model. Commands: :clear, :history, :exit")
    while True:
        try:
            query = input("\nUser: ").strip()
        except EOFError:
            return 0
        if query == ":exit":
            return 0
        if query == ":clear":
            history = []
            continue
        if query == ":history":
            for message in history:
                print(f"{message['role'].capitalize()}: {message['content']}")
            continue
        if not query:
            continue
        if query.startswith(":tool "):
            history.append({"role": "tool", "content": query[len(":tool "):]})
        else:
            history.append({"role": "user", "content": query})
        reply = generate_reply(model, tokenizer, system + history, args.max_new_tokens, streamer=streamer, **sampling)
        reasoning, answer = split_reasoning(reply)
        # the reasoning goes back as the template expects it (Qwen3's drops old thoughts; ChatML's keeps them)
        history.append({"role": "assistant", "content": answer} | ({"reasoning_content": reasoning} if reasoning else {}))


def main(argv=None) -> int:
    return console.run_entry_point(chat, argv)


if __name__ == "__main__":
    sys.exit(main())

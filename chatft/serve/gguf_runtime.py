"""A GGUF file run by llama.cpp itself (llama-cpp-python, when installed): the runtime that llama.cpp, Ollama and
LM Studio users serve the file with, so what it answers here is what they will see.

- LlamaCppModel.load: the file, loaded quietly (llama.cpp's loading log shows with CHATFT_VERBOSE=1), after a child
  process has loaded it and decoded with it once: a llama.cpp that dies on it (a SIGSEGV in AMX kernels, llama.cpp
  #20824; a SIGILL on a CPU older than the build) is one error line, not the end of the chat;
- llama_cpp_build_problem: what in the installed llama.cpp's build differs from requirements-dev.txt's flags;
- LlamaCppModel.reply: one chat reply through llama.cpp's chat completion, which renders the prompt with the chat
  template embedded in the file (export_gguf.py writes the one training used) and stops at the file's EOS
  (<|im_end|>); greedy unless sampling is asked for, as chatft.serve.chat.generate_reply;
- llama_cpp_reply_perplexity: the perplexity of assistant replies as chatft.export.gptq.reply_perplexity measures it,
  from llama.cpp's own logits (computed with the quantized weights, as a user's runtime computes).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys

import numpy as np

from chatft import console
from chatft.data.chat_format import IGNORE_INDEX, TokenizedSample
from chatft.errors import ArgumentError, ChatftError, DataError, ModelPathError

DEFAULT_CONTEXT = 4096  # tokens a chat's prompt and reply can hold together (llama.cpp's cache is sized for them)
# requirements-dev.txt builds llama.cpp for x86-64 with AVX2 at most: kernels of these, compiled in by a native
# build on a CPU that has them, are left out (its AMX matmul crashes on quantized files, llama.cpp #20824)
LEFT_OUT_FEATURES = ("AMX_INT8", "AMX_BF16", "AVX512")
REINSTALL = ("pip install --force-reinstall --no-deps --no-cache-dir -r <(grep ^llama-cpp-python "
             "requirements-dev.txt)")
# The child's work: load the file and decode a prompt with it, as a chat's first reply does (the prompt is a batch
# of tokens, then one token at a time). Exits 0, or 1 with a Python error (left to the load in this process to
# report); a signal's death is llama.cpp's crash.
PROBE = """
import sys
import llama_cpp
path, threads = sys.argv[1], int(sys.argv[2])
llama = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=threads, verbose=False)
prompt = llama.tokenize(b"The capital of France is Paris. The capital of Italy is Rome. The capital of", add_bos=True)
llama.eval(prompt[:32])
llama.eval(prompt[:1])
"""
_probed: set[tuple] = set()  # the files that ran in a child: (real path, size, modification time)


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_build_problem() -> str:
    """"" when the installed llama.cpp was built as requirements-dev.txt asks; else which kernels it holds that that
    build leaves out, e.g. "llama.cpp was built with AMX_INT8, AVX512 kernels" (from its system-info line, which
    names each CPU feature compiled in: "AMX_INT8 = 1")."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    present = [feature for feature in LEFT_OUT_FEATURES if f"{feature} = 1" in info]
    return f"llama.cpp was built with {', '.join(present)} kernels" if present else ""


def run_in_child(path: str, threads: int, code: str | None = None) -> None:
    """Run `code` (PROBE: load the GGUF file `path` in llama.cpp and decode with it) in a child Python; if llama.cpp
    kills the child, raise one ChatftError naming the signal and what to do. Once per file in a process."""
    if not os.path.isfile(path):
        return  # the load in this process says what is wrong with the path
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key in _probed:
        return
    quiet = None if console.verbose() else subprocess.DEVNULL
    status = subprocess.run([sys.executable, "-c", code or PROBE, path, str(threads)], stdout=quiet,
                            stderr=quiet).returncode
    if status < 0 or status >= 0xC0000000:  # POSIX: minus the signal; Windows: an exception code (0xC0000005)
        try:
            died = signal.Signals(-status).name if status < 0 else f"exception 0x{status:X}"
        except ValueError:
            died = f"signal {-status}"
        build = llama_cpp_build_problem()
        if "AMX" in build:
            build += "; its AMX matmul crashes on quantized files, llama.cpp #20824"
        cause = f" ({build})" if build else ""
        raise ChatftError(f"llama.cpp crashed ({died}) running {path}{cause}. Rebuild it with the flags in "
                          f"requirements-dev.txt (README.md, llama.cpp): {REINSTALL}; or pip uninstall "
                          "llama-cpp-python to chat through transformers instead.")
    _probed.add(key)


class LlamaCppModel:
    """A GGUF file loaded in llama.cpp, with the chat template embedded in it."""

    def __init__(self, llama, path: str):
        self.llama, self.path = llama, path

    @classmethod
    def load(cls, path: str, context: int = DEFAULT_CONTEXT, all_logits: bool = False) -> "LlamaCppModel":
        """`all_logits`: keep every position's logits (for llama_cpp_reply_perplexity), not only the last one's."""
        import llama_cpp

        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        run_in_child(path, threads)  # a crash of llama.cpp there is one error line; here it would end the process
        try:
            with console.library_output_hidden():  # llama.cpp logs from C while loading, whatever `verbose` says
                llama = llama_cpp.Llama(model_path=path, n_ctx=context, n_threads=threads, logits_all=all_logits,
                                        verbose=console.verbose())
        except ValueError as error:  # llama-cpp-python's only report of a file llama.cpp refused (its log said why)
            raise ModelPathError(f"{path}: llama.cpp could not load this GGUF file ({error}); a truncated or "
                                 "foreign file? CHATFT_VERBOSE=1 shows llama.cpp's own log.") from None
        return cls(llama, path)

    @property
    def chat_template_source(self) -> str:
        """Where the prompt format comes from: "chat_template.default" is the template embedded in the file."""
        return self.llama.chat_format

    def describe(self) -> str:
        import gguf

        file_type = self.llama.metadata.get("general.file_type", "")
        named = {str(int(t)): t.name.removeprefix("MOSTLY_").lower() for t in gguf.LlamaFileType}.get(file_type, "?")
        return f"GGUF file, {named}, in llama.cpp on {self.llama.n_threads} CPU threads"

    def reply(self, messages: list[dict], max_new_tokens: int = 256, streamer=None, tools=None, do_sample=False,
              temperature: float = 0.7, top_p: float = 0.8, seed: int | None = None) -> str:
        """One assistant reply to `messages`, streamed to `streamer` (a chatft.serve.chat.ThinkingStreamer) when given."""
        sampling = ({"temperature": temperature, "top_p": top_p, "top_k": 0, "min_p": 0.0, "seed": seed}
                    if do_sample else {"temperature": 0.0})  # llama.cpp's greedy sampler at temperature 0
        try:
            completion = self.llama.create_chat_completion(
                messages=messages, tools=tools, max_tokens=max_new_tokens, repeat_penalty=1.0,
                stream=streamer is not None, **sampling)
            if streamer is None:
                return (completion["choices"][0]["message"]["content"] or "").strip()
            pieces = []
            for chunk in completion:
                piece = chunk["choices"][0]["delta"].get("content") or ""
                pieces.append(piece)
                streamer.on_finalized_text(piece)
        except ValueError as error:  # the prompt is longer than the context llama.cpp was given
            if "exceed context window" not in str(error):
                raise
            raise ArgumentError(f"the conversation no longer fits llama.cpp's context ({error}); start a shorter "
                                "one (:clear in a chat).") from None
        streamer.on_finalized_text("", stream_end=True)
        return "".join(pieces).strip()


def llama_cpp_reply_perplexity(path: str, samples: list[TokenizedSample]) -> float:
    """exp(mean negative log-likelihood) of the labelled tokens (assistant replies and their <|im_end|>) of `samples`,
    from the logits llama.cpp computes with the GGUF file `path`."""
    llama = LlamaCppModel.load(path, context=max(len(sample.input_ids) for sample in samples), all_logits=True).llama
    total_nll, total_tokens = 0.0, 0
    for sample in samples:
        labels = np.asarray(sample.labels[1:])
        positions = np.flatnonzero(labels != IGNORE_INDEX)
        if positions.size == 0:
            continue
        llama.reset()
        llama.eval(sample.input_ids)
        logits = np.asarray(llama.scores[: len(sample.input_ids) - 1], dtype=np.float64)[positions]
        peak = logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
        total_nll += float((log_norm - logits[np.arange(positions.size), labels[positions]]).sum())
        total_tokens += positions.size
    if total_tokens == 0:
        raise DataError("The samples have no assistant token to measure.")
    return float(np.exp(total_nll / total_tokens))

"""The one error type for a user's mistake.

Every problem with what a user gave (a flag, a path, a data file, an output directory) is raised as a
`ChatftError` subclass whose message names the thing and says what to do. Every entry point catches
`ChatftError` alone (chatft.console.run_entry_point): it prints `error: <message>` and exits with status 2.
Anything else is a bug and keeps its traceback.
"""


class ChatftError(Exception):
    """A user's input cannot be used; the message names it and says how to fix it."""


class ArgumentError(ChatftError):
    """The flags contradict each other or name something that does not exist."""


class ModelPathError(ArgumentError):
    """A model, adapter or GGUF path (or hub id) that does not hold what it should."""


class DataError(ChatftError):
    """A data file cannot be used; the message lists every problem found (up to a cap)."""


class OutputDirError(ChatftError):
    """An output directory that must not be written to (holds a previous result, or is an input)."""


class MergeError(ChatftError):
    """The adapter cannot be merged as asked."""


class QuantizeError(ChatftError):
    """The model or settings cannot be quantized as asked."""

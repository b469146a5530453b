"""Checks of one flag's value, shared by every entry point's `validate_args` (imports no ML library).

Each check returns a problem, one line naming the flag, its value and what is wrong, or None; an entry point
collects the problems of all its flags and raises them at once (`raise_problems`), before any model loads, so a
user fixes every mistake in one round.

    >>> out_of_range("--lora_r", 0, low=1)
    '--lora_r 0: must be at least 1.'
    >>> out_of_range("--lora_dropout", 1.0, low=0, high=1, high_inclusive=False)
    '--lora_dropout 1.0: must be at least 0 and below 1.'
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from typing import Iterable

from chatft.errors import ArgumentError

SEED_RANGE = (0, 2**32 - 1)  # numpy's generator, seeded by every entry point's --seed, takes no other value


def parse_error(message: str, script: str) -> ArgumentError:
    """argparse's complaint (a bad choice, an unknown, malformed or missing flag) as one line: argparse would print the
    usage of every flag above it."""
    return ArgumentError(f"{message} (python {script} --help lists every flag)")


class ScriptArgumentParser(argparse.ArgumentParser):
    """The scripts' argparse (`prog`: the script's file name; `description`: its docstring, shown as written): a parse
    error is one ArgumentError line, which console.run_entry_point prints with exit status 2."""

    def __init__(self, prog: str, description: str | None):
        super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        raise parse_error(message, self.prog)


def out_of_range(flag: str, value, low=None, high=None, *, low_inclusive: bool = True,
                 high_inclusive: bool = True, what: str = "") -> str | None:
    """A problem when `value` lies outside [low, high] (a bound None: unbounded; an exclusive bound: the value itself
    is refused); `what` adds why the bound is there."""
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if not (too_low or too_high):
        return None
    bounds = []
    if low is not None:
        bounds.append(f"at least {low}" if low_inclusive else f"above {low}")
    if high is not None:
        bounds.append(f"at most {high}" if high_inclusive else f"below {high}")
    return f"{flag} {value}: must be {' and '.join(bounds)}{f' ({what})' if what else ''}."


def read_json_file(flag: str, path: str) -> tuple[object, str | None]:
    """(the JSON value the file `path` holds, None), or (None, the problem): a missing file, or where the JSON breaks
    (line and column, as the parser reports them)."""
    if not os.path.isfile(path):
        return None, f"{flag} {path}: {'is a directory, not a file' if os.path.isdir(path) else 'no such file'}."
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except json.JSONDecodeError as error:
        return None, f"{flag} {path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})."
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{flag} {path}: cannot be read ({error})."


def unknown_name_problem(name: str, known: Iterable[str], what: str = "flag") -> str:
    """`name` is not one of `known`; the closest known one is suggested (as git does): of the similar names, the one
    sharing the longest beginning with it (--lora_rank: --lora_r, not --local_rank)."""
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    closest = max(close, key=lambda known_name: len(os.path.commonprefix([name, known_name])), default=None)
    return f"unknown {what} {name}" + (f": did you mean {closest}?" if closest else ".")


def raise_problems(problems: Iterable[str | None]) -> None:
    """Raise one ArgumentError listing every problem (None entries are checks that passed); return if there is none."""
    found = [problem for problem in problems if problem]
    if found:
        raise ArgumentError("\n".join(found))

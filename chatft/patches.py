"""The one place chatft reaches into a library's or the interpreter's private parts, where no public switch does
what it needs. Each patch is a context manager that restores what it changed; each private name used here is pinned
by a test in tests/test_patches.py that fails the day the library changes under it. Libraries are imported inside
the functions: chatft.console imports this module before any library is imported (see packages_hidden).

checkpoints_written_as(prefix)     transformers: the folder name a checkpoint is written under
gptqmodel_logs_written_to(folder)  gptqmodel: where its per-run log files go
packages_hidden(names)             the import system: installed packages that look uninstalled
run_exit_steps()                   CPython: what a normal exit does before the interpreter's teardown

checkpoints_written_as: transformers.Trainer writes each checkpoint straight into `checkpoint-N`, so a crash mid-save
would leave a partial `checkpoint-N` for `--resume_from_checkpoint True` to pick. No argument, callback or public
method chooses that name: Trainer._save_checkpoint builds it from the module global
`transformers.trainer.PREFIX_CHECKPOINT_DIR`, read at save time. Setting it for a block lets
chatft.train.trainer.AtomicCheckpoints rename a checkpoint to `checkpoint-N` once it is whole. What this relies on:
- Trainer writes a checkpoint into f"{transformers.trainer.PREFIX_CHECKPOINT_DIR}-{global_step}" in its output_dir;
- get_last_checkpoint, sort_checkpoints and rotate_checkpoints (transformers.trainer_utils) keep their own
  "checkpoint" prefix, so a scratch folder is never resumed from, and never rotated away, by transformers.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Iterable


@contextlib.contextmanager
def checkpoints_written_as(prefix: str):
    """Within the block, transformers.Trainer writes checkpoint folders named f"{prefix}-{global_step}"."""
    import transformers.trainer

    original = transformers.trainer.PREFIX_CHECKPOINT_DIR
    transformers.trainer.PREFIX_CHECKPOINT_DIR = prefix
    try:
        yield
    finally:
        transformers.trainer.PREFIX_CHECKPOINT_DIR = original


@contextlib.contextmanager
def gptqmodel_logs_written_to(folder: str | os.PathLike):
    """Within the block, gptqmodel writes its per-run log files into `folder` (created when the first is written)
    instead of ./logs of the working directory. gptqmodel has no setting for it: each processor builds its log file's
    path from the module global gptqmodel.looper.loop_processor._PROJECT_LOG_DIR (a Path) when it is created.
    Import gptqmodel first (chatft.console.import_gptqmodel: quietly)."""
    from gptqmodel.looper import loop_processor

    original = loop_processor._PROJECT_LOG_DIR
    loop_processor._PROJECT_LOG_DIR = Path(folder)
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = original


@contextlib.contextmanager
def packages_hidden(names: Iterable[str]):
    """Within the block, the packages `names` look uninstalled to this process; yields those hidden (a package
    already imported cannot be hidden and is left alone).

    A None entry in sys.modules is Python's documented way to block an import: `importlib.util.find_spec` returns
    None and `import` raises ModuleNotFoundError, which is how transformers and peft detect a package that is not
    installed, so they take their well-trodden "not installed" path. Neither has a public switch for it. Both
    remember the answer (lru_cache) the first time they are asked, often at import: enter the block before importing
    them, for as long as they are used."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        yield hidden
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def run_exit_steps() -> None:
    """Do now what a normal interpreter exit does for the program before the interpreter's teardown
    (Py_FinalizeEx): join the non-daemon threads, after threading's own exit hooks have told thread pools
    (concurrent.futures) to stop, then run the atexit handlers (logging, temporary files, trackers such as wandb).
    For a process that then leaves with os._exit (chatft.train.distributed.exit_process). No public function does either:
    joining threading.enumerate() ourselves would wait forever on a pool's workers, which stop only when
    threading._shutdown runs those hooks, and atexit runs its handlers only at exit, but for the private
    atexit._run_exitfuncs."""
    shutdown_threads = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls first
    if shutdown_threads is not None:
        shutdown_threads()
    atexit._run_exitfuncs()

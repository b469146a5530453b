"""Output directories: the guard that keeps an earlier result safe, and staging, so a result is written whole or not
at all. finetune.py checks its --output_dir with `check_output_dir`; merge_lora.py and run_gptq.py check theirs with
`check_new_output_dir` and write into `staged_output_dir`."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from chatft.errors import OutputDirError


def check_output_dir(training_args) -> None:
    """Refuse a non-empty output_dir unless --overwrite_output_dir, before anything is loaded or written."""
    output_dir = training_args.output_dir
    if training_args.resume_from_checkpoint:  # continuing the run that is in output_dir
        return
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not training_args.overwrite_output_dir:
        raise OutputDirError(
            f"output_dir {output_dir} is not empty; choose another --output_dir or pass --overwrite_output_dir."
        )


def check_new_output_dir(output_dir: str, overwrite: bool, inputs: tuple[str, ...] = ()) -> None:
    """For merge_lora.py and run_gptq.py: refuse a non-empty output_dir unless --overwrite, and an output_dir
    that is one of the inputs (it would be replaced while it is still needed)."""
    target = os.path.realpath(output_dir)
    for source in inputs:
        if source and os.path.exists(source) and os.path.realpath(source) == target:
            raise OutputDirError(f"--output_dir {output_dir} is also an input ({source}); write the result elsewhere.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirError(f"{output_dir} exists and is not a directory.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise OutputDirError(f"{output_dir} is not empty; choose another output directory or pass --overwrite.")


@contextlib.contextmanager
def staged_output_dir(output_dir: str):
    """Yield a scratch directory beside `output_dir` to write the result into.

    Only when the block succeeds does the scratch directory take `output_dir`'s place (a previous
    `output_dir` is removed only then); if it fails, the scratch directory is deleted and whatever was
    at `output_dir` is untouched. So a crash or a bad input never leaves a half-written model behind.
    """
    output_dir = os.path.abspath(output_dir)
    parent, name = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    # mkdtemp (and the atomic writes of some libraries) make private files; give them the usual modes
    umask = os.umask(0)
    os.umask(umask)
    for directory, _, files in os.walk(scratch):
        os.chmod(directory, 0o777 & ~umask)
        for file in files:
            os.chmod(os.path.join(directory, file), 0o666 & ~umask)
    previous = None
    if os.path.exists(output_dir):
        previous = tempfile.mkdtemp(prefix=f".{name}.previous-", dir=parent)
        os.rename(output_dir, os.path.join(previous, name))
    os.rename(scratch, output_dir)
    if previous:
        shutil.rmtree(previous, ignore_errors=True)

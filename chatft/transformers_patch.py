"""The one place chatft changes transformers at run time: the folder name a checkpoint is written under.

transformers.Trainer writes each checkpoint straight into `checkpoint-N`, so a crash mid-save would leave a partial
`checkpoint-N` for `--resume_from_checkpoint True` to pick. No argument, callback or public method chooses that name:
Trainer._save_checkpoint builds it from the module global `transformers.trainer.PREFIX_CHECKPOINT_DIR`, read at save
time. `checkpoints_written_as(prefix)` sets that global for a block, so that chatft.trainer.AtomicCheckpoints can
rename a checkpoint to `checkpoint-N` once it is whole. What this relies on, checked by
tests/test_trainer.py::test_transformers_still_writes_checkpoints_under_the_patched_prefix, which fails the day
transformers changes:

- Trainer writes a checkpoint into f"{transformers.trainer.PREFIX_CHECKPOINT_DIR}-{global_step}" in its output_dir;
- get_last_checkpoint, sort_checkpoints and rotate_checkpoints (transformers.trainer_utils) keep their own
  "checkpoint" prefix, so a scratch folder is never resumed from, and never rotated away, by transformers.
"""

from __future__ import annotations

import contextlib

import transformers.trainer


@contextlib.contextmanager
def checkpoints_written_as(prefix: str):
    """Within the block, transformers.Trainer writes checkpoint folders named f"{prefix}-{global_step}"."""
    original = transformers.trainer.PREFIX_CHECKPOINT_DIR
    transformers.trainer.PREFIX_CHECKPOINT_DIR = prefix
    try:
        yield
    finally:
        transformers.trainer.PREFIX_CHECKPOINT_DIR = original

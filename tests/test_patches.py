"""chatft.patches: each patch does what it says and restores what it changed, and each private name it relies on
still behaves as it relies on. These tests fail the day a library (transformers, gptqmodel, peft) or CPython changes
under a patch."""

import atexit
import importlib.util
import inspect
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch
import transformers
from transformers.trainer_utils import get_last_checkpoint

from chatft import console, patches
from support import ROOT


def test_transformers_still_writes_checkpoints_under_the_patched_prefix(tmp_path):
    """What checkpoints_written_as relies on, on a plain transformers.Trainer: checkpoint folders are named from
    transformers.trainer.PREFIX_CHECKPOINT_DIR at save time, and neither resuming (get_last_checkpoint) nor
    --save_total_limit's rotation looks at folders under another prefix. Fails the day transformers changes that."""
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, use_cache=False)
    torch.manual_seed(0)
    rows = [{"input_ids": list(range(i, i + 8)), "labels": list(range(i, i + 8))} for i in range(4)]
    args = transformers.TrainingArguments(str(tmp_path), max_steps=2, save_strategy="steps", save_steps=1,
                                          save_total_limit=1, per_device_train_batch_size=2, use_cpu=True,
                                          report_to="none", logging_strategy="no")
    trainer = transformers.Trainer(model=transformers.Qwen2ForCausalLM(config), args=args, train_dataset=rows)
    with patches.checkpoints_written_as("scratch"):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["scratch-1", "scratch-2"]  # neither rotated away
    assert os.path.isfile(tmp_path / "scratch-2" / "trainer_state.json")
    assert get_last_checkpoint(str(tmp_path)) is None
    assert transformers.trainer.PREFIX_CHECKPOINT_DIR == "checkpoint"


def test_gptqmodel_builds_its_log_files_under_the_patched_folder(tmp_path):
    """gptqmodel's processors name their log file from loop_processor._PROJECT_LOG_DIR (a Path, ./logs) when
    created, creating the folder; gptqmodel_logs_written_to points it elsewhere for the block only."""
    console.import_gptqmodel()
    from gptqmodel.looper import loop_processor

    original = loop_processor._PROJECT_LOG_DIR
    assert original == Path("logs")
    with patches.gptqmodel_logs_written_to(tmp_path / "gptq_logs"):
        log_file = loop_processor.LoopProcessor._build_log_file_path("gptq", "now")
    assert log_file.parent == tmp_path / "gptq_logs" and log_file.parent.is_dir()
    assert loop_processor._PROJECT_LOG_DIR is original
    assert "_PROJECT_LOG_DIR" in inspect.getsource(loop_processor.LoopProcessor._build_log_file_path)


def test_hidden_packages_look_uninstalled_to_transformers_and_peft(monkeypatch):
    """transformers and peft detect gptqmodel and bitsandbytes with importlib.util.find_spec, which a None entry in
    sys.modules answers with None (their answers are cached: their undecorated functions are asked here)."""
    import peft.import_utils
    import transformers.utils.import_utils as transformers_imports

    detectors = [transformers_imports.is_gptqmodel_available, transformers_imports.is_bitsandbytes_available,
                 peft.import_utils.is_gptqmodel_available, peft.import_utils.is_bnb_available]
    for name in console.OPTIONAL_PACKAGES:
        assert importlib.util.find_spec(name) is not None, f"{name} is installed for this test"
        monkeypatch.delitem(sys.modules, name, raising=False)  # as in a process that has not imported it
    assert all(inspect.unwrap(detect)() for detect in detectors)
    with patches.packages_hidden(list(console.OPTIONAL_PACKAGES) + ["json"]) as hidden:
        assert hidden == list(console.OPTIONAL_PACKAGES)  # json is imported already: not hidden
        assert not any(inspect.unwrap(detect)() for detect in detectors)
        try:
            import gptqmodel  # noqa: F401
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("a hidden package was imported")
    assert not any(name in sys.modules for name in console.OPTIONAL_PACKAGES)  # restored: importable again
    assert all(inspect.unwrap(detect)() for detect in detectors)


# A process that, like chatft.train.distributed.exit_process, runs the exit steps and leaves with os._exit: a non-daemon
# thread still running, a thread pool never shut down, an atexit handler, each must have finished or run before.
EXIT_STEPS_PROGRAM = """
import atexit, concurrent.futures, os, threading, time
from chatft import patches
# one write each (print writes the text and its newline apart: two threads' lines interleaved, "thread joinedpool ...")
threading.Thread(target=lambda: (time.sleep(0.3), os.write(1, b"thread joined\\n"))).start()
concurrent.futures.ThreadPoolExecutor(1).submit(lambda: (time.sleep(0.3), os.write(1, b"pool drained\\n")))
atexit.register(lambda: print("atexit ran", flush=True))
patches.run_exit_steps()
print("exit steps done", flush=True)
os._exit(3)
"""


def test_exit_steps_join_threads_and_pools_then_run_atexit_handlers():
    assert callable(threading._shutdown) and callable(atexit._run_exitfuncs)  # CPython's private names
    result = subprocess.run([sys.executable, "-c", EXIT_STEPS_PROGRAM], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert sorted(lines[:2]) == ["pool drained", "thread joined"], result.stdout + result.stderr
    assert lines[2:] == ["atexit ran", "exit steps done"], result.stdout + result.stderr

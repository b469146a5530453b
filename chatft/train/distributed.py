"""The end of a multi-process run (torchrun: DeepSpeed ZeRO-2/3, FSDP, DDP), the same on every rank.

Without it, a run ended in a race. Rank 0 writes the model after the last collective (the ZeRO-3 gather in
`save_model`); the other ranks returned from `train()` at once and their interpreters finalized while rank 0 was
still writing, with the process groups never destroyed and gloo's worker threads still running. A gloo worker
thread that drops the last reference to a collective's tensor needs the GIL (the tensor's Python object goes
with it); once the interpreter is finalizing, CPython 3.11 ends such a thread with pthread_exit, whose forced
unwinding through a noexcept C++ frame calls std::terminate: "terminate called without an active exception",
SIGABRT (backtrace of a rank that aborted so: ProcessGroupGloo::runLoop -> ~AsyncWork -> TensorImpl::
decref_pyobject -> take_gil -> PyThread_exit_thread -> std::terminate). torchrun then killed rank 0 mid-write and
reported a failure. Destroying the process groups alone does not close the window: objects that outlive the run keep
them referenced (under ZeRO-3: every parameter's ds_process_group, DeepSpeed's zero.Init, the ZeRO optimizer and
engine, even with the trainer dropped and gc.collect() run), so gloo's threads are all still there afterwards.

So a run ends in this order (`end_run`): rank 0 writes everything; every rank waits at a barrier for that; the
process groups are destroyed; then, when finetune.py itself is the program, each process finishes the way a
normal exit would (non-daemon threads joined, atexit handlers run, output flushed) and leaves with os._exit,
skipping only the interpreter's teardown, which has nothing left to do but is where the abort happened.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import importlib.util
import logging
import os
import sys

import torch

from chatft import patches

logger = logging.getLogger(__name__)


def is_multi_process() -> bool:
    """Whether this process is one of several in an initialized torch.distributed process group."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def destroy_process_groups() -> None:
    """Destroy every process group: through DeepSpeed's comm when it wraps them (it also drops its own
    references to the groups it made), else through torch.distributed. Nothing to do if none is left."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()


def exit_process(status: int = 0) -> None:
    """Leave now with `status`, after everything a normal interpreter exit does for the program (join the
    non-daemon threads and thread pools, run the atexit handlers: logging, temporary files, trackers such as
    wandb), but without the interpreter's teardown, where threads of C++ libraries can abort the process."""
    try:
        patches.run_exit_steps()  # CPython's private threading._shutdown and atexit._run_exitfuncs
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):  # closed or broken pipe: nothing more can be written to it anyway
                pass
        try:
            ctypes.CDLL(None).fflush(None)  # C stdio buffers (what C++ libraries printed), which _exit drops
        except (OSError, AttributeError):
            pass
        os._exit(status)


def end_run(trainer, exit_when_done: bool) -> None:
    """Call on every rank once rank 0 has written everything into output_dir. Single-process runs: nothing.

    Every rank waits until all have arrived, so none exits while rank 0 is still writing and the output is whole
    before any process ends. Then, with `exit_when_done` (finetune.py is the program), the process groups are
    destroyed and the process exits with status 0: nothing after this point can fail the finished run. Without
    it (train() called by other code, which may still use the group, like tests/helpers/zero3_roundtrip.py), the
    groups are destroyed at exit instead, while the interpreter is still whole."""
    if not is_multi_process():
        return
    trainer.accelerator.wait_for_everyone()
    if not exit_when_done:
        atexit.register(destroy_process_groups)
        return
    destroy_process_groups()
    logger.debug("Process groups destroyed; exiting.")
    exit_process(0)


def deepspeed_op_built_on_first_use(config: dict | None) -> str | None:
    """The op DeepSpeed compiles for this run's optimizer when the machine has neither a prebuilt one (a DeepSpeed
    installed with DS_BUILD_OPS) nor one compiled by an earlier run (torch's extension cache): fused_adam for a
    config's Adam/AdamW, cpu_adam when that optimizer is offloaded; None when nothing will be compiled. The build
    is silent and takes minutes, so the run says so before it starts."""
    optimizer = (config or {}).get("optimizer", {}).get("type", "")
    if optimizer.lower() not in ("adam", "adamw") or importlib.util.find_spec("deepspeed") is None:
        return None
    offload = (config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    op = "cpu_adam" if str(offload).lower() in ("cpu", "nvme") else "fused_adam"
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import get_default_build_root

    if installed_ops.get(op, False):
        return None
    # torch keeps each compiled op in <root>/<python and CUDA version>/<op>/<op>.so, root TORCH_EXTENSIONS_DIR if set
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return None if glob.glob(os.path.join(root, "*", op, f"{op}*.so")) else op

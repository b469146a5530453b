"""Measuring tools, run from the repository root as modules; each imports the toolkit and patches nothing.

    python -m bench.throughput       tokens/s, padding, peak memory and MFU: this toolkit vs the seed vs TRL
    python -m bench.memory           peak memory of full-parameter, LoRA and Q-LoRA training
    python -m bench.profile_table    Qwen's profiling table (memory, s/it per mode and length); finetune/profile.sh
    python -m bench.models           Qwen-shaped models at random initialisation; every tool's -m takes their names

bench.harness holds what they share: one measurement per fresh process, and memory measurement;
bench.qwen_published, Qwen's own profiling table, which bench.profile_table prints beside its numbers.
"""

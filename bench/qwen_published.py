"""Qwen's published profile of fine-tuning memory and speed, for bench.profile_table to print beside its own.

From the README of QwenLM/Qwen, "Profiling of Memory and Speed" (SOURCE): a single A100-SXM4-80G, CUDA 11.8,
PyTorch 2.0, flash attention 2, batch size 1, gradient accumulation 8; memory in GB and seconds per iteration at
sequence lengths 256 to 8192. Qwen-7B's full-parameter row ran on 2 A100s and stopped at 1024 tokens (GPU
memory); cells Qwen left empty are absent here. Qwen-1 ran its own model code (QWenLMHeadModel); bench.models'
qwen-1.8b and qwen-7b are Qwen2-architecture models of the same sizes, trained by this toolkit, on whatever
hardware runs the profile, so the two numbers of a cell are the same measurement on different hardware and code.
"""

SOURCE = "https://github.com/QwenLM/Qwen/blob/main/README.md#profiling-of-memory-and-speed"
HARDWARE = "A100-80G"

# model -> mode (bench.profile_table's names) -> sequence length -> (memory GB, seconds per iteration)
PROFILE: dict[str, dict[str, dict[int, tuple[float, float]]]] = {
    "Qwen-1.8B": {
        "lora": {256: (6.7, 1.0), 512: (7.4, 1.0), 1024: (8.4, 1.1), 2048: (11.0, 1.7), 4096: (16.2, 3.3),
                 8192: (21.8, 6.8)},
        "lora_emb": {256: (13.7, 1.0), 512: (14.0, 1.0), 1024: (14.0, 1.1), 2048: (15.1, 1.8), 4096: (19.7, 3.4),
                     8192: (27.7, 7.0)},
        "qlora": {256: (5.8, 1.4), 512: (6.0, 1.4), 1024: (6.6, 1.4), 2048: (7.8, 2.0), 4096: (10.2, 3.4),
                  8192: (15.8, 6.5)},
        "full": {256: (43.5, 2.1), 512: (43.5, 2.2), 1024: (43.5, 2.2), 2048: (43.5, 2.3), 4096: (47.1, 2.8),
                 8192: (48.3, 5.6)},
    },
    "Qwen-7B": {
        "lora": {256: (20.1, 1.2), 512: (20.4, 1.5), 1024: (21.5, 2.8), 2048: (23.8, 5.2), 4096: (29.7, 10.1),
                 8192: (36.6, 21.3)},
        "lora_emb": {256: (33.7, 1.4), 512: (34.1, 1.6), 1024: (35.2, 2.9), 2048: (35.1, 5.3), 4096: (39.2, 10.3),
                     8192: (48.5, 21.7)},
        "qlora": {256: (11.5, 3.0), 512: (11.5, 3.0), 1024: (12.3, 3.5), 2048: (13.9, 7.0), 4096: (16.9, 11.6),
                  8192: (23.5, 22.3)},
        "full": {256: (139.2, 4.0), 512: (148.0, 4.0), 1024: (162.0, 4.5)},  # 2 GPUs: memory of both together
    },
}
GPUS = {("Qwen-7B", "full"): 2}  # every other row: 1 GPU

# bench.models shapes with a published counterpart
COUNTERPART = {"qwen-1.8b": "Qwen-1.8B", "qwen-7b": "Qwen-7B"}


def published(shape: str | None, mode: str, length: int) -> str | None:
    """Qwen's cell for a bench.models shape, as Qwen printed it ("20.1G / 1.2s/it"), or None where there is none.

    >>> published("qwen-7b", "lora", 256)
    '20.1G / 1.2s/it'
    >>> published("qwen-7b", "full", 256)
    '139.2G / 4.0s/it (2 GPUs)'
    """
    model = COUNTERPART.get(shape or "")
    cell = PROFILE.get(model, {}).get(mode, {}).get(length)
    if cell is None:
        return None
    gpus = GPUS.get((model, mode), 1)
    return f"{cell[0]}G / {cell[1]}s/it" + (f" ({gpus} GPUs)" if gpus > 1 else "")

"""Models: loading for full, LoRA and Q-LoRA training (load), per-sample attention (attention), what a model
path holds (sources)."""

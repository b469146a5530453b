"""After training: merging an adapter (merge), GPTQ (gptq), GGUF files (gguf) and their K-quants (kquants)."""

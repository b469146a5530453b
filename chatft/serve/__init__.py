"""Using a result: chat with any checkpoint (chat), a GGUF file in llama.cpp (gguf_runtime)."""

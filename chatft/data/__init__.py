"""Data: file formats -> typed conversations (formats), rendering and label masks (chat_format), tokenized
datasets, packing and collators (datasets)."""

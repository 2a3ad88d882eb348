"""Helpers for fine-tuning, prediction and evaluation on labelled `.h5ad` files (no DeepSpeed here)."""

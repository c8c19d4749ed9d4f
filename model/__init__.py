"""nanoGPT-style GPT used by ``train.py``."""

from model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]

"""Data for BASIS: the GPT-2 tokenizer, prepared token files, and training/validation loaders.

See data/README.md for the corpora, the on-disk format and the preparation commands.
"""

from data.errors import DataError
from data.loaders import TrainLoader, ValLoader
from data.prepared import prepare_data
from data.storage import load_split
from data.tokenizer import get_gpt2_encoding

__all__ = [
    "DataError",
    "TrainLoader",
    "ValLoader",
    "get_gpt2_encoding",
    "load_split",
    "prepare_data",
]

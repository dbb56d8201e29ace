"""The tokenizer of a checkpoint: its tokenizer.json through the `tokenizers` package."""
from pathlib import Path
from typing import Union


def load_tokenizer(path: Union[str, Path]):
    """A `tokenizers.Tokenizer` from `path` (a checkpoint folder holding tokenizer.json, or the file itself);
    "default" is the embedded default model's."""
    from tokenizers import Tokenizer

    from .default import resolve_checkpoint

    path = resolve_checkpoint(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json")
    return Tokenizer.from_file(str(file))

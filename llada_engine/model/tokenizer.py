"""The tokenizer of a checkpoint: its tokenizer.json through the `tokenizers` package."""
from pathlib import Path
from typing import Optional, Union


def load_tokenizer(path: Union[str, Path], *, revision: Optional[str] = None):
    """A `tokenizers.Tokenizer` from `path`: a checkpoint folder holding tokenizer.json, the file itself, a
    Hugging Face Hub id (at `revision`) or "default", the embedded default model's."""
    from tokenizers import Tokenizer

    from .hub import resolve_checkpoint

    path = resolve_checkpoint(path, revision=revision)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises its own exception type for a malformed file
        raise ValueError(f"{file}: not a readable tokenizer.json ({error})") from None

"""The embedded default model: a small LLaDA2.0-architecture model that llada_engine trained itself on the
Shakespeare plays (configs/tiny/: AR pre-training, WSD conversion, SFT), shipped as package data so that the
engine generates text offline the moment it is installed. `load_model("default")` and
`load_tokenizer("default")` resolve to it."""
from pathlib import Path
from typing import Union

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
DEFAULT_NAME = "default"


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """`path` as a folder; the name "default" is the embedded default model."""
    return DEFAULT_MODEL_DIR if str(path) == DEFAULT_NAME else Path(path)

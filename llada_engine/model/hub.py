"""Where a checkpoint name points: "default" (the embedded model), a local folder, or a Hugging Face Hub id.

    resolve_checkpoint("default")                      # llada_engine/default_model, its checksums verified
    resolve_checkpoint("path/to/folder")               # a local folder (or file) wins over a Hub id
    resolve_checkpoint("inclusionAI/LLaDA2.0-mini", revision="main")   # a snapshot folder in the HF cache

A Hub id goes through `huggingface_hub.snapshot_download`, so the cache is huggingface_hub's own (HF_HOME,
HF_HUB_CACHE), HF_HUB_OFFLINE=1 reads it without touching the network, and a model not yet cached is
downloaded where a network exists. Only what the engine reads is fetched: the JSON files (config, shard
index, tokenizer, chat template) and the safetensors weights; never pickles or code.
"""
from pathlib import Path
from typing import Optional, Union

from . import default

HUB_FILES = ["*.json", "*.safetensors"]


def is_hub_id(name: str) -> bool:
    """Whether `name` is spelled like a Hub repo id ("name" or "namespace/name")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_checkpoint(name: Union[str, Path], *, revision: Optional[str] = None) -> Path:
    """The local path that `name` stands for (see the module doc). A pathlib.Path is always a local path."""
    if isinstance(name, str) and name == default.DEFAULT_NAME:
        if revision is not None:
            raise ValueError(f"revision: {revision!r} applies to Hugging Face Hub ids, not to the embedded model")
        return default.verified_default_model()
    path = Path(name)
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision: {path} is a local folder; revision applies to Hugging Face Hub ids only")
        return path
    if isinstance(name, Path) or not is_hub_id(name):
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    return _snapshot(name, revision)


def _snapshot(repo_id: str, revision: Optional[str]) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except (OSError, ValueError) as error:  # huggingface_hub's not-found, offline and HTTP errors are OSErrors
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set"
        else:
            reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise FileNotFoundError(
            f"{repo_id}: no such local folder, and as a Hugging Face Hub id (revision {revision or 'main'}) it is "
            f"not in the cache {constants.HF_HUB_CACHE} and could not be downloaded ({reason})") from None

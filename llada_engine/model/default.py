"""The embedded default model: a small LLaDA2.0-architecture model that llada_engine trained itself on the
Shakespeare plays (configs/tiny/: AR pre-training, WSD conversion, SFT), shipped as package data so that the
engine generates text offline the moment it is installed. `load_model("default")` and
`load_tokenizer("default")` resolve to it, after checking every file against the sha256 sums of its
checksums.json, so that a damaged installation fails loudly instead of generating from corrupt weights."""
import hashlib
import json
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"
DEFAULT_NAME = "default"
CHECKSUMS_FILE = "checksums.json"


def verified_default_model() -> Path:
    """DEFAULT_MODEL_DIR, once each file that checksums.json names has its recorded sha256."""
    folder = DEFAULT_MODEL_DIR
    sums_file = folder / CHECKSUMS_FILE
    damaged = "the installed default model is damaged; reinstall llada_engine"
    try:
        sums = json.loads(sums_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{sums_file}: unreadable ({error}): {damaged}") from None
    if not isinstance(sums, dict) or not sums:
        raise ValueError(f"{sums_file}: expected a JSON object of file name -> sha256: {damaged}")
    for name, expected in sums.items():
        file = folder / name
        if Path(name).name != name:
            raise ValueError(f"{sums_file}: entry {name!r} is not a plain file name: {damaged}")
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing: {damaged}")
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise ValueError(f"{file}: sha256 {digest.hexdigest()} does not match {CHECKSUMS_FILE} ({expected}): "
                             f"{damaged}")
    return folder

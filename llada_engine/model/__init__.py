"""The LLaDA2.0 model (docs/ARCHITECTURE.md, Model): config, layers, checkpoints and the op backend switch."""
from .checkpoint import load_model, save_pretrained
from .config import LLaDA2Config
from .model import LLaDA2Model
from .tokenizer import load_tokenizer

__all__ = ["LLaDA2Config", "LLaDA2Model", "load_model", "load_tokenizer", "save_pretrained"]

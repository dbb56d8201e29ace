"""LLaDA2.0 model configuration, read from and written to the release's own `config.json` keys.

Only the keys that change the computation are fields; every other key of the file is kept in `extra`
and written back unchanged, so a checkpoint's config round-trips. Every field is checked for its type and
range when the config is made, so a bad file fails here, naming the key, and not later in the model.

The release's config.json has no `mask_token_id` (its `generate()` takes the MASK id as an argument): such a
config loads with mask_token_id None, and what needs the MASK id (generate, training) asks for it there.
"""
import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any, Optional, Union

MODEL_TYPE = "llada2_moe"
ARCHITECTURE = "LLaDA2MoeModelLM"
RELEASE_MASK_ID = 156895  # the MASK id of the LLaDA2.0 releases (their config.json does not say it)
DEFAULT_EOS_ID = 156892

_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "num_experts_per_tok", "n_group",
                  "topk_group", "moe_intermediate_size")
_OPTIONAL_COUNTS = ("num_experts", "num_shared_experts", "first_k_dense_replace")  # int >= 0 (or None)
_TOKEN_IDS = ("pad_token_id", "eos_token_id", "mask_token_id")                     # int >= 0 or None
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")         # finite, > 0
_BOOLS = ("use_qkv_bias", "use_qk_norm", "use_bias", "tie_word_embeddings")


@dataclasses.dataclass
class LLaDA2Config:
    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: Optional[int] = 128
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    use_bias: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 600000.0
    partial_rotary_factor: float = 0.5
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    num_experts: Optional[int] = 256
    num_shared_experts: Optional[int] = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    moe_intermediate_size: int = 512
    first_k_dense_replace: int = 1
    pad_token_id: int = DEFAULT_EOS_ID
    eos_token_id: Optional[int] = DEFAULT_EOS_ID
    mask_token_id: Optional[int] = None
    torch_dtype: Optional[str] = "bfloat16"
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self._check_types()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    def _check_types(self) -> None:
        """Each field of the right type and range (JSON booleans are not numbers here, 2.0 is not an int)."""
        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        def fail(key, expected):
            raise ValueError(f"{key} must be {expected}, got {getattr(self, key)!r}")

        for key in _POSITIVE_INTS:
            value = getattr(self, key)
            if not (is_int(value) and value >= 1) and not (key == "head_dim" and value is None):
                fail(key, "a positive int")
        for key in _OPTIONAL_COUNTS + _TOKEN_IDS:
            value = getattr(self, key)
            if value is not None and not (is_int(value) and value >= 0):
                fail(key, "an int >= 0 (or null)")
        for key in _POSITIVE_FLOATS:
            value = getattr(self, key)
            if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                fail(key, "a finite number > 0")
        factor = self.partial_rotary_factor
        if not (isinstance(factor, numbers.Real) and not isinstance(factor, bool) and 0 < factor <= 1):
            fail("partial_rotary_factor", "a number in (0, 1]")
        for key in _BOOLS:
            if not isinstance(getattr(self, key), bool):
                fail(key, "true or false")
        if not isinstance(self.hidden_act, str):
            fail("hidden_act", "a string")
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            fail("torch_dtype", "a string (or null)")

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts is not None and self.num_experts > 0 and layer >= self.first_k_dense_replace

    def validate(self, source: str = "config") -> None:
        def fail(message):
            raise ValueError(f"{source}: {message}")

        if self.hidden_act != "silu":
            fail(f"hidden_act {self.hidden_act!r} is not supported (LLaDA2.0 uses 'silu')")
        if self.rope_scaling is not None:
            fail(f"rope_scaling {self.rope_scaling!r} is not supported (LLaDA2.0 uses none)")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings is not supported (LLaDA2.0 has an untied lm_head)")
        if self.extra.get("norm_head"):
            fail("norm_head is not supported")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                 f"{self.num_key_value_heads}")
        if self.rope_dim < 2 or self.rope_dim % 2 or self.rope_dim > self.head_dim:
            fail(f"rotary dims {self.rope_dim} (head_dim x partial_rotary_factor) must be even, >= 2 and <= head_dim")
        if self.num_experts:
            if self.num_experts % self.n_group:
                fail(f"num_experts {self.num_experts} is not divisible by n_group {self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                fail(f"topk_group {self.topk_group} must be in [1, n_group = {self.n_group}]")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                fail(f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, num_experts]")

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "LLaDA2Config":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of config keys, got {type(data).__name__}")
        model_type = data.get("model_type")
        archs = data.get("architectures") or []
        if model_type != MODEL_TYPE and ARCHITECTURE not in archs:
            raise ValueError(f"{source}: model_type {model_type!r} / architectures {archs} is not a LLaDA2.0 "
                             f"checkpoint (expected model_type {MODEL_TYPE!r})")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        if isinstance(known.get("eos_token_id"), list):
            known["eos_token_id"] = known["eos_token_id"][0] if known["eos_token_id"] else None
        extra = {k: v for k, v in data.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "LLaDA2Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.extra)
        data.setdefault("model_type", MODEL_TYPE)
        data.setdefault("architectures", [ARCHITECTURE])
        for f in dataclasses.fields(self):
            if f.name != "extra":
                data[f.name] = getattr(self, f.name)
        return data

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

"""The run configuration: a YAML or JSON file with the sections `model`, `data`, `optim`, `run` and `phases`.

    model:  init (checkpoint folder to start from, e.g. an AR model) | config (a config.json path or inline
            dict: a random model, trained from scratch), tokenizer (default: the init folder), dtype (the
            compute dtype: float32 | bfloat16 | float16; the masters and optimizer state stay fp32),
            pure_low_precision (weights and optimizer state in dtype too), backend, init_seed
    data:   train, valid (.txt: documents separated by blank lines; .jsonl: {"text"} | {"prompt", "response"}
            | {"prompt", "chosen", "rejected"}; or a folder made by llada-engine prepare-data), row_length,
            batch_rows (global, over all processes), micro_batch_rows (rows per forward per process; 0: all of
            a process's rows at once), valid_rows, split_long
    optim:  lr, weight_decay, betas, eps, grad_clip, warmup_steps, decay_steps, min_lr_ratio,
            embedding_noise_std, embedding_noise_steps, expert_bias_update_rate (0: frozen),
            moe_aux_loss_coef (0: off)
    run:    out_dir, seed, eval_every, save_every, keep_last, valid_t, parallel (ddp | fsdp), threads,
            device (auto | cuda | cpu), activation_checkpointing, peak_tflops (per process, for MFU)
    phases: a list of {objective, steps, block_size (an int or "full"), lr, t_min, t_max, weighting,
            complementary, mask_band, cap_lambda, beta, name}

Relative paths are relative to the working directory (the shipped configs/ are run from the repository
root). model.init may name a run folder: its latest checkpoint is used. Unknown keys, missing keys and bad
values raise a ValueError that names the file and the key.
"""
import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .schedule import OBJECTIVES, WEIGHTINGS, Phase, Schedule

DTYPES = ("float32", "bfloat16", "float16")
PARALLEL = ("ddp", "fsdp")
DEVICES = ("auto", "cuda", "cpu")


@dataclasses.dataclass
class ModelSpec:
    init: Optional[str] = None
    config: Union[str, dict, None] = None
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    pure_low_precision: bool = False
    backend: str = "kernels"
    init_seed: int = 0


@dataclasses.dataclass
class DataSpec:
    train: str = ""
    valid: Optional[str] = None
    row_length: int = 256
    batch_rows: int = 8
    micro_batch_rows: int = 0       # 0: batch_rows / processes (one forward per process and step)
    valid_rows: int = 0             # 0: every validation row
    split_long: bool = False        # cut plain-text documents longer than a row into row-sized pieces


@dataclasses.dataclass
class OptimSpec:
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    decay_steps: int = 0
    min_lr_ratio: float = 0.0
    embedding_noise_std: float = 0.0
    embedding_noise_steps: int = 0
    expert_bias_update_rate: float = 0.0
    moe_aux_loss_coef: float = 0.0


@dataclasses.dataclass
class RunSpec:
    out_dir: str = "runs/default"
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0             # 0: only at the end
    keep_last: int = 0              # 0: keep every checkpoint
    valid_t: Optional[float] = None  # fixed mask ratio for validation (default: the phase's t range)
    parallel: str = "ddp"
    threads: int = 0                # torch threads per process; 0: torch's default
    device: str = "auto"            # auto (CUDA when there is a GPU) | cuda | cpu
    activation_checkpointing: bool = False
    peak_tflops: float = 0.0        # 0: a known GPU's dense bf16 peak, else no MFU


@dataclasses.dataclass
class RunConfig:
    model: ModelSpec
    data: DataSpec
    optim: OptimSpec
    run: RunSpec
    schedule: Schedule
    source: str = "config"


def _fail(source: str, key: str, message: str):
    raise ValueError(f"{source}: {key}: {message}")


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string: take it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _section(raw: Any, cls, source: str, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _fail(source, where, f"must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        _fail(source, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(fields)})")
    values = {}
    for name, value in raw.items():
        default = fields[name].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                _fail(source, f"{where}.{name}", f"must be true or false, got {value!r}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            value = _yaml_float(value) if isinstance(default, float) else value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                _fail(source, f"{where}.{name}", f"must be a number, got {value!r}")
            if isinstance(default, int) and not isinstance(value, int):
                _fail(source, f"{where}.{name}", f"must be an integer, got {value!r}")
        elif isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or len(value) != len(default):
                _fail(source, f"{where}.{name}", f"must be a list of {len(default)} numbers, got {value!r}")
            value = tuple(float(v) for v in value)
        values[name] = value
    return cls(**values)


def _resolve(path: Optional[str]) -> Optional[str]:
    return None if path is None else str(Path(path).expanduser())


def _phase(raw: Any, index: int, optim: OptimSpec, data: DataSpec, source: str) -> Phase:
    where = f"phases[{index}]"
    if not isinstance(raw, dict):
        _fail(source, where, f"must be a mapping, got {raw!r}")
    raw = dict(raw)
    for key in ("objective", "steps"):
        if key not in raw:
            _fail(source, f"{where}.{key}", "missing")
    raw.setdefault("lr", optim.lr)
    for key in ("lr", "t_min", "t_max", "cap_lambda", "beta"):
        if key in raw:
            raw[key] = _yaml_float(raw[key])
    raw.setdefault("block_size", 1 if raw["objective"] == "ar" else "full")
    if raw["block_size"] == "full":
        raw["block_size"] = data.row_length
    band = raw.pop("mask_band", None)
    fields = {f.name for f in dataclasses.fields(Phase)} - {"mask_band"}
    unknown = sorted(set(raw) - fields)
    if unknown:
        _fail(source, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(fields | {'mask_band'}))})")
    try:
        phase = Phase(**raw)
    except TypeError as error:
        _fail(source, where, str(error))
    for key in ("lr", "t_min", "t_max", "cap_lambda", "beta"):
        value = getattr(phase, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(source, f"{where}.{key}", f"must be a number, got {value!r}")
    if phase.objective not in OBJECTIVES:
        _fail(source, f"{where}.objective", f"must be one of {OBJECTIVES}, got {phase.objective!r}")
    if not isinstance(phase.steps, int) or phase.steps < 1:
        _fail(source, f"{where}.steps", f"must be a positive integer, got {phase.steps!r}")
    if not isinstance(phase.block_size, int) or phase.block_size < 1:
        _fail(source, f"{where}.block_size", f"must be a positive integer or 'full', got {phase.block_size!r}")
    if data.row_length % phase.block_size:
        _fail(source, f"{where}.block_size", f"{phase.block_size} does not divide data.row_length {data.row_length}")
    if phase.objective == "ar" and phase.block_size != 1:
        _fail(source, f"{where}.block_size", f"objective 'ar' is causal (block_size 1), got {phase.block_size}")
    if phase.objective == "mdlm" and phase.block_size != data.row_length:
        _fail(source, f"{where}.block_size", f"objective 'mdlm' covers the whole document: use 'full' "
                                              f"(= row_length {data.row_length}), got {phase.block_size}")
    if not 0.0 <= phase.t_min <= phase.t_max <= 1.0:
        _fail(source, f"{where}.t_min/t_max", f"need 0 <= t_min <= t_max <= 1, got {phase.t_min}, {phase.t_max}")
    if phase.weighting not in WEIGHTINGS:
        _fail(source, f"{where}.weighting", f"must be one of {WEIGHTINGS}, got {phase.weighting!r}")
    if band is not None:
        if not isinstance(band, (list, tuple)) or len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0:
            _fail(source, f"{where}.mask_band", f"must be [lo, hi] with 0 <= lo <= hi <= 1, got {band!r}")
        if max(phase.t_min, band[0]) > min(phase.t_max, band[1]):
            _fail(source, f"{where}.mask_band", f"{band} does not meet [t_min, t_max] = [{phase.t_min}, {phase.t_max}]")
        phase.mask_band = (float(band[0]), float(band[1]))
    if phase.lr <= 0:
        _fail(source, f"{where}.lr", f"must be positive, got {phase.lr}")
    phase.name = phase.name or f"{index}-{phase.objective}-b{phase.block_size}"
    return phase


def parse_overrides(pairs: list[str]) -> dict:
    """`section.key=value` strings (values read as YAML) into a nested dict."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected section.key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: Union[str, Path], overrides: Optional[dict] = None) -> RunConfig:
    """Reads and validates a run configuration (YAML or JSON); `overrides` is merged over the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({error})") from None
    return config_from_dict(_merge(raw or {}, overrides or {}), source=str(path))


def config_from_dict(raw: dict, *, source: str = "config") -> RunConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: must be a mapping of sections")
    sections = ("model", "data", "optim", "run", "phases")
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        _fail(source, unknown[0], f"unknown section (known: {', '.join(sections)})")
    model = _section(raw.get("model"), ModelSpec, source, "model")
    data = _section(raw.get("data"), DataSpec, source, "data")
    optim = _section(raw.get("optim"), OptimSpec, source, "optim")
    run = _section(raw.get("run"), RunSpec, source, "run")

    if (model.init is None) == (model.config is None):
        _fail(source, "model", "give exactly one of model.init (a checkpoint folder) and model.config "
                               "(a config.json or an inline config, for a random model)")
    if model.init is None and model.tokenizer is None:
        _fail(source, "model.tokenizer", "missing (needed when the model is built from model.config)")
    if model.dtype not in DTYPES:
        _fail(source, "model.dtype", f"must be one of {DTYPES}, got {model.dtype!r}")
    if model.pure_low_precision and model.dtype == "float32":
        _fail(source, "model.pure_low_precision", "is for model.dtype bfloat16 or float16 (float32 is not low)")
    model.init = _resolve(model.init)
    model.tokenizer = _resolve(model.tokenizer) or model.init
    if isinstance(model.config, str):
        model.config = _resolve(model.config)
    if not data.train:
        _fail(source, "data.train", "missing")
    data.train, data.valid = _resolve(data.train), _resolve(data.valid)
    for key in ("row_length", "batch_rows"):
        if getattr(data, key) < 1:
            _fail(source, f"data.{key}", f"must be positive, got {getattr(data, key)}")
    if data.micro_batch_rows < 0:
        _fail(source, "data.micro_batch_rows", f"must be >= 0, got {data.micro_batch_rows}")
    for key in ("expert_bias_update_rate", "moe_aux_loss_coef"):
        if getattr(optim, key) < 0:
            _fail(source, f"optim.{key}", f"must be >= 0, got {getattr(optim, key)}")
    if run.peak_tflops < 0:
        _fail(source, "run.peak_tflops", f"must be >= 0, got {run.peak_tflops}")
    if run.parallel not in PARALLEL:
        _fail(source, "run.parallel", f"must be one of {PARALLEL}, got {run.parallel!r}")
    if run.device not in DEVICES:
        _fail(source, "run.device", f"must be one of {DEVICES}, got {run.device!r}")
    run.valid_t = _yaml_float(run.valid_t)
    if run.valid_t is not None and (isinstance(run.valid_t, (bool, str)) or not 0.0 < run.valid_t <= 1.0):
        _fail(source, "run.valid_t", f"must be in (0, 1], got {run.valid_t}")
    if run.eval_every and not data.valid:
        _fail(source, "run.eval_every", "needs data.valid")
    run.out_dir = _resolve(run.out_dir)

    phases = raw.get("phases")
    if not isinstance(phases, list) or not phases:
        _fail(source, "phases", "must be a non-empty list of phases")
    schedule = Schedule([_phase(p, i, optim, data, source) for i, p in enumerate(phases)],
                        optim.warmup_steps, optim.decay_steps, optim.min_lr_ratio)
    if optim.warmup_steps + optim.decay_steps > schedule.total_steps:
        _fail(source, "optim.warmup_steps/decay_steps", f"{optim.warmup_steps} + {optim.decay_steps} exceed the "
                                                         f"run's {schedule.total_steps} steps")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        _fail(source, "optim.min_lr_ratio", f"must be in [0, 1], got {optim.min_lr_ratio}")
    return RunConfig(model, data, optim, run, schedule, source)

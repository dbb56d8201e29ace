"""The training loop: a run configuration (config.py) in, checkpoints, metrics and a loss curve out.

    Trainer(config, resume=False).run() -> the last checkpoint's folder

Each step takes the next `batch_rows` packed rows (the global batch; process r of W takes rows r, r + W, ...),
masks each row (and draws the embedding noise of its MASK tokens) with generators seeded by (seed, step, row),
so the noise depends neither on the number of processes nor on where a run was resumed, computes the phase's
objective (losses.py), and takes one AdamW step with gradient clipping at the WSD learning rate.
RUN/metrics.jsonl gets a line per step (loss, lr, tokens/s) and per validation; RUN/loss.png is drawn at the end. With resume, the run continues from its
latest complete checkpoint and ends with the same weights as a run never interrupted.
"""
import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ..model import LLaDA2Config, load_model, load_tokenizer
from ..model.init import random_model
from . import distributed
from .checkpoint import (list_checkpoints, load_optimizer, load_rng, load_trainer_state, save_checkpoint)
from .config import RunConfig
from .data import PackedData, lcm, read_corpus
from .embedding_noise import embedding_noise
from .losses import collate, objective_loss
from .noise import mask_row
from .plot import write_loss_png
from .schedule import Phase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VALID_STREAM = 2**31 - 1     # the row-seed "step" of validation noise: the same masks at every evaluation
OBJECTIVE_DATA = {"ar": ("text", "sft"), "bdlm": ("text", "sft"), "mdlm": ("text", "sft"), "dpo": ("dpo",)}


def row_generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1))


def resolve_init(path: str) -> Path:
    """A checkpoint folder, or the latest checkpoint of a run folder."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "checkpoints").is_dir():
        found = list_checkpoints(p)
        if not found:
            raise FileNotFoundError(f"{p}: a run folder without a complete checkpoint")
        return found[-1]
    return p


def tokenizer_file(path: str) -> str:
    p = resolve_init(path)
    return str(p / "tokenizer.json" if p.is_dir() else p)


class Trainer:
    def __init__(self, config: RunConfig, *, resume: bool = False):
        self.config = config
        self.env = distributed.setup(config.run.device)
        if self.env.device.type == "cuda" and config.model.dtype == "float32" and config.model.backend == "kernels":
            raise ValueError("model.dtype float32 on CUDA: the CUDA attention kernels take bfloat16 or float16; "
                             "set model.dtype: bfloat16 (or run.device: cpu)")
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        torch.manual_seed(config.run.seed)
        self.out = Path(config.run.out_dir)
        self.tokenizer_file = tokenizer_file(config.model.tokenizer)
        self.tokenizer = load_tokenizer(self.tokenizer_file)
        self.schedule = config.schedule
        self.resume_from: Optional[Path] = None
        if resume:
            found = list_checkpoints(self.out)
            if not found:
                raise FileNotFoundError(f"{self.out}: --resume found no checkpoint under {self.out / 'checkpoints'}")
            self.resume_from = found[-1]
        elif list_checkpoints(self.out):
            raise FileExistsError(f"{self.out}: this run folder already has checkpoints; continue it with --resume "
                                  f"or set another run.out_dir")

        self.module = self._initial_model() if self.resume_from is None else self._load(self.resume_from)
        self.module.train()
        mc = self.module.config
        if mc.eos_token_id is None:
            raise ValueError(f"{config.source}: the model config has no eos_token_id")
        self.mask_id, self.eos_id = mc.mask_token_id, mc.eos_token_id
        if self.tokenizer.get_vocab_size() > mc.vocab_size:
            raise ValueError(f"{self.tokenizer_file}: {self.tokenizer.get_vocab_size()} tokens do not fit the model's "
                             f"vocab_size {mc.vocab_size}")
        data = config.data
        pad_multiple = lcm(p.block_size for p in self.schedule.phases)

        def packed(path, **kw):
            return PackedData(read_corpus(path, self.tokenizer), data.row_length, eos_id=self.eos_id,
                              pad_id=mc.pad_token_id, split_long=data.split_long, pad_multiple=pad_multiple, **kw)

        self.train_data = packed(data.train, seed=config.run.seed)
        self.valid_rows = packed(data.valid, shuffle=False).epoch_rows(data.valid_rows) if data.valid else []
        for i, phase in enumerate(self.schedule.phases):
            if self.train_data.kind not in OBJECTIVE_DATA[phase.objective]:
                raise ValueError(f"{config.source}: phases[{i}].objective {phase.objective!r} cannot train on "
                                 f"{self.train_data.kind} data ({data.train})")
        if data.batch_rows % self.env.world:
            raise ValueError(f"{config.source}: data.batch_rows {data.batch_rows} is not divisible by the "
                             f"{self.env.world} processes")
        self.reference = None
        if any(p.objective == "dpo" for p in self.schedule.phases):
            self.reference = self._initial_model().eval().requires_grad_(False)

        self.model = distributed.wrap(self.module, config.run.parallel, self.env)
        self.sharded = self.env.world > 1 and config.run.parallel == "fsdp"
        o = config.optim
        decay = [p for p in self.module.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.module.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=self.schedule.lr_at(0), betas=o.betas, eps=o.eps)
        self.step = 0
        if self.resume_from is not None:
            state = load_trainer_state(self.resume_from)
            load_optimizer(self.resume_from, self.module, self.optimizer, sharded=self.sharded)
            load_rng(self.resume_from)
            self.step = state["step"]
            self.train_data.load_state(state["data"])

    def _initial_model(self):
        m, dtype = self.config.model, DTYPES[self.config.model.dtype]
        if m.init is not None:
            return load_model(resolve_init(m.init), dtype=dtype, device=self.env.device, backend=m.backend)
        if isinstance(m.config, dict):
            config = LLaDA2Config.from_dict(dict({"model_type": "llada2_moe"}, **m.config), source="model.config")
        else:
            config = LLaDA2Config.from_file(m.config)
        return random_model(config, seed=m.init_seed, dtype=dtype, device=self.env.device, backend=m.backend)

    def _load(self, path: Path):
        return load_model(path, dtype=DTYPES[self.config.model.dtype], device=self.env.device,
                          backend=self.config.model.backend)

    # ---- one step -------------------------------------------------------------------------------------------

    def _batch(self, rows, phase: Phase, stream: int, first_row: int, t_fixed: Optional[float] = None,
               noise_std: float = 0.0):
        """This process's share of `rows`, masked, as one packed batch on the device, and (with noise_std) the
        embedding noise of its MASK tokens [M, H], drawn per row."""
        pairs, noise = [], []
        seed = self.config.run.seed
        for i in range(self.env.rank, len(rows), self.env.world):
            row = rows[i]
            if phase.objective == "ar":
                noisy = mask_row(row, row_generator(0), mask_id=self.mask_id, t_min=0.0, t_max=0.0)
            else:
                t_min, t_max = (t_fixed, t_fixed) if t_fixed is not None else (phase.t_min, phase.t_max)
                noisy = mask_row(row, row_generator(seed, stream, first_row + i), mask_id=self.mask_id,
                                 t_min=t_min, t_max=t_max, band=phase.mask_band, complementary=phase.complementary)
            pairs += [(row, n) for n in noisy]
            if noise_std:
                hidden = self.module.config.hidden_size
                for copy, n in enumerate(noisy):
                    g = row_generator(seed, stream, first_row + i, copy + 1)
                    noise.append(noise_std * torch.randn(int(n.masked.sum()), hidden, generator=g))
        batch = collate(pairs).to(self.env.device)
        return batch, (torch.cat(noise).to(self.env.device) if noise_std else None)

    def _loss(self, model, batch, phase: Phase):
        return objective_loss(model, batch, phase, self.env.total, self.reference)

    def train_step(self, step: int) -> dict:
        phase = self.schedule.phase_at(step)
        lr = self.schedule.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        rows = self.train_data.next_rows(self.config.data.batch_rows)
        o = self.config.optim
        noise_std = o.embedding_noise_std if step < o.embedding_noise_steps and phase.objective != "ar" else 0.0
        batch, noise = self._batch(rows, phase, step, 0, noise_std=noise_std)
        context = contextlib.nullcontext()
        if noise is not None:
            context = embedding_noise(self.module, mask_id=self.mask_id, noise=noise)
        with context:
            loss, extras = self._loss(self.model, batch, phase)
        (loss * self.env.world).backward()
        clip = o.grad_clip if o.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = int(self.env.total(torch.tensor(float(len(batch.x0)))).item())
        seconds = time.perf_counter() - start
        return {"step": step + 1, "phase": phase.name, "objective": phase.objective, "block_size": phase.block_size,
                "lr": lr, "loss": float(self.env.total(loss.detach()).item()), "grad_norm": float(grad_norm),
                "tokens": tokens, "tokens_per_s": tokens / seconds, "seconds": seconds,
                **{k: float(self.env.total(v.float()).item()) for k, v in extras.items()}}

    @torch.no_grad()
    def validate(self, step: int) -> float:
        phase = self.schedule.phase_at(step)
        n, losses = self.config.data.batch_rows, []
        for first in range(0, len(self.valid_rows), n):
            rows = self.valid_rows[first:first + n]
            if len(rows) < self.env.world:
                break
            batch, _ = self._batch(rows, phase, VALID_STREAM, first, self.config.run.valid_t)
            loss, _ = self._loss(self.module, batch, phase)
            losses.append(float(self.env.total(loss).item()))
        return float(np.mean(losses)) if losses else float("nan")

    # ---- the run ----------------------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.env.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_metrics(self) -> None:
        """Drops the metric lines after the step a resumed run restarts from."""
        path = self.out / "metrics.jsonl"
        if self.env.main and path.is_file():
            lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in lines))

    def _save(self, step: int, valid_loss: Optional[float]) -> Path:
        phase = self.schedule.phase_at(step - 1)
        state = {"data": self.train_data.state(), "valid_loss": valid_loss, "phase": phase.name,
                 "objective": phase.objective, "block_size": phase.block_size, "lr": self.schedule.lr_at(step - 1)}
        path = save_checkpoint(self.out, step, self.module, self.optimizer, state, self.tokenizer_file,
                               sharded=self.sharded, rank=self.env.rank)
        keep = self.config.run.keep_last
        if self.env.main and keep:
            for old in list_checkpoints(self.out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def _plot(self) -> None:
        records = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
        phases = [(first, phase.name) for first, phase in zip(self.schedule.boundaries(), self.schedule.phases)]
        write_loss_png(self.out / "loss.png", train, valid, phases)

    def run(self) -> Path:
        total = self.schedule.total_steps
        run = self.config.run
        if self.env.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._trim_metrics()
        last = self.resume_from
        bar = tqdm(total=total, initial=self.step, disable=not self.env.main, desc="train", dynamic_ncols=True)
        try:
            for step in range(self.step, total):
                record = self.train_step(step)
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                phase=record["phase"], refresh=False)
                bar.update(1)
                done = step + 1
                save = (run.save_every and done % run.save_every == 0) or done == total
                valid_loss = None
                if self.valid_rows and (save or (run.eval_every and done % run.eval_every == 0)):
                    valid_loss = self.validate(step)
                    self._log({"step": done, "phase": record["phase"], "valid_loss": valid_loss})
                    if self.env.main:
                        bar.write(f"step {done}: valid loss {valid_loss:.4f}")
                if save:
                    last = self._save(done, valid_loss)
        finally:
            bar.close()
        if self.env.main:
            self._plot()
        return last

    def close(self) -> None:
        distributed.teardown(self.env)


def train(config: RunConfig, *, resume: bool = False) -> Path:
    trainer = Trainer(config, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()

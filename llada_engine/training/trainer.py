"""The training loop: a run configuration (config.py) in, checkpoints, metrics and a loss curve out.

    Trainer(config, resume=False).run() -> the last checkpoint's folder

Each step takes the next `batch_rows` packed rows (the global batch; process r of W takes rows r, r + W, ...)
in micro-batches of `micro_batch_rows` rows per forward, masks each row (and draws the embedding noise of its
MASK tokens) with generators seeded by (seed, step, row), so the noise depends neither on the number of
processes or micro-batches nor on where a run was resumed, computes the phase's objective (losses.py) with
its counts summed over the whole global batch first, so that the micro-batches' gradients add up to the
gradient of the one big batch (no gradient reduction before the last micro-batch), and takes one AdamW step
with gradient clipping at the WSD learning rate on the fp32 master weights (precision.py); then each MoE
layer's expert_bias moves towards balance by the global batch's expert loads (moe_balance.py).
RUN/metrics.jsonl gets a line per step (loss, lr, tokens/s, MFU, fill rate, activation memory, expert loads
per MoE layer, DPO rewards) and per validation; RUN/loss.png is drawn at the end. With resume, the run
continues from its latest complete checkpoint and ends with the same weights as a run never interrupted.
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

from ..model import LLaDA2Config, load_tokenizer
from ..model.config import RELEASE_MASK_ID
from ..model.init import random_model
from . import distributed
from .checkpoint import (list_checkpoints, load_optimizer, load_rng, load_trainer_state, load_weights,
                         parameters_to, save_checkpoint)
from .config import RunConfig
from .data import PackedData, lcm, read_corpus, sha256_file
from .embedding_noise import embedding_noise
from .flops import forward_flops, peak_flops
from .losses import (ar_targets, batch_counts, cap_entropy, collate, combine, diffusion_logits, objective_terms,
                     summarize)
from .memory import ActivationMeter, checkpoint_layers
from .moe_balance import (balance_loss, clear_routing, load_stats, moe_layers, routed_counts, update_expert_bias,
                          worst_layer)
from .noise import mask_row
from .plot import write_loss_png
from .precision import DTYPES, compute_in, grad_scaler
from .schedule import Phase

VALID_STREAM = 2**31 - 1     # the row-seed "step" of validation noise: the same masks at every evaluation
OBJECTIVE_DATA = {"ar": ("text", "sft"), "bdlm": ("text", "sft"), "mdlm": ("text", "sft"), "dpo": ("dpo",)}
TIMING = ("seconds", "tokens_per_s", "mfu")   # the metrics that depend on the machine's speed


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


def call_cu_seqlens(batch, phase: Phase) -> torch.Tensor:
    """cu_seqlens of the model call of a phase's objective on `batch` ([x_t | x_0] under bd3)."""
    return batch.cu_seqlens if phase.objective in ("ar", "mdlm") else batch.cu_seqlens * 2


class Trainer:
    def __init__(self, config: RunConfig, *, resume: bool = False):
        self.config = config
        self.env = distributed.setup(config.run.device)
        m = config.model
        if self.env.device.type == "cuda" and m.dtype == "float32" and m.backend == "kernels":
            raise ValueError("model.dtype float32 on CUDA: the CUDA attention kernels take bfloat16 or float16; "
                             "set model.dtype: bfloat16 (or run.device: cpu)")
        if self.env.device.type == "cpu" and m.dtype == "float16" and m.backend == "kernels":
            raise ValueError("model.dtype float16 on the CPU: the CPU kernels take float32 or bfloat16; set "
                             "model.dtype: bfloat16 (or model.backend: reference)")
        self.compute_dtype = DTYPES[m.dtype]
        self.master_dtype = self.compute_dtype if m.pure_low_precision else torch.float32
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        torch.manual_seed(config.run.seed)
        self.out = Path(config.run.out_dir)
        self.tokenizer_file = tokenizer_file(m.tokenizer)
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

        self.module = self._initial_model(self.master_dtype, self.resume_from)
        self.module.train()
        mc = self.module.config
        self._check_token_ids(config)
        self.mask_id, self.eos_id = mc.mask_token_id, mc.eos_token_id
        if self.tokenizer.get_vocab_size() > mc.vocab_size:
            raise ValueError(f"{self.tokenizer_file}: {self.tokenizer.get_vocab_size()} tokens do not fit the model's "
                             f"vocab_size {mc.vocab_size}")
        self._setup_data()
        self.reference = None
        if any(p.objective == "dpo" for p in self.schedule.phases):
            self.reference = self._initial_model(self.compute_dtype, None).eval().requires_grad_(False)

        self.moe = moe_layers(self.module)
        self.meter = ActivationMeter(self.module)
        self.sharded = self.env.world > 1 and config.run.parallel == "fsdp"
        mixed = self.master_dtype != self.compute_dtype
        if mixed and not self.sharded:
            compute_in(self.module, self.compute_dtype)
        if config.run.activation_checkpointing:
            checkpoint_layers(self.module, self.meter)
        self.model = distributed.wrap(self.module, config.run.parallel, self.env,
                                      self.compute_dtype if mixed else None)
        o = config.optim
        decay = [p for p in self.module.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.module.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=self.schedule.lr_at(0), betas=o.betas, eps=o.eps)
        self.scaler = grad_scaler(self.compute_dtype, self.env.device)
        self.peak = peak_flops(config.run.peak_tflops, self.env.device)
        self.step = 0
        if self.resume_from is not None:
            state = load_trainer_state(self.resume_from)
            load_optimizer(self.resume_from, self.module, self.optimizer, sharded=self.sharded)
            load_rng(self.resume_from)
            self.step = state["step"]
            self.train_data.load_state(state["data"])
            if "grad_scaler" in state:
                self.scaler.load_state_dict(state["grad_scaler"])

    def _check_token_ids(self, config) -> None:
        """The MASK, EOS and padding ids the run feeds the model: each a token id inside the vocabulary (a
        release's config.json has no mask_token_id), MASK not EOS; the error names the file and the key."""
        mc = self.module.config
        where = f"{config.model.init}/config.json" if config.model.init else "model.config"
        checks = (("mask_token_id", "a MASK id the model can train with", " other than EOS",
                   f" (LLaDA2.0 releases use {RELEASE_MASK_ID})"),
                  ("eos_token_id", "an EOS id", "", ""), ("pad_token_id", "a padding id", "", ""))
        for key, what, other, hint in checks:
            value = getattr(mc, key)
            if value is None or not 0 <= value < mc.vocab_size or (other and value == mc.eos_token_id):
                raise ValueError(f"{config.source}: {key} {value} of {where} is not {what} (a token id in "
                                 f"[0, {mc.vocab_size}){other}); set \"{key}\" there{hint}")

    def _setup_data(self) -> None:
        config, data = self.config, self.config.data
        mc = self.module.config

        def packed(path, **kw):
            corpus = read_corpus(path, self.tokenizer)
            if corpus.tokenizer_sha256 is not None and corpus.tokenizer_sha256 != sha256_file(self.tokenizer_file):
                raise ValueError(f"{path}: prepared with another tokenizer than the run's {self.tokenizer_file}")
            if corpus.max_token_id >= mc.vocab_size:
                raise ValueError(f"{path}: token id {corpus.max_token_id} is outside the model's vocab_size "
                                 f"{mc.vocab_size}")
            return PackedData(corpus, data.row_length, eos_id=self.eos_id, pad_id=mc.pad_token_id,
                              split_long=data.split_long, pad_multiple=lcm(p.block_size for p in self.schedule.phases),
                              **kw)

        self.train_data = packed(data.train, seed=config.run.seed)
        self.valid_rows = packed(data.valid, shuffle=False).epoch_rows(data.valid_rows) if data.valid else []
        for i, phase in enumerate(self.schedule.phases):
            if self.train_data.kind not in OBJECTIVE_DATA[phase.objective]:
                raise ValueError(f"{config.source}: phases[{i}].objective {phase.objective!r} cannot train on "
                                 f"{self.train_data.kind} data ({data.train})")
        world = self.env.world
        if data.batch_rows % world:
            raise ValueError(f"{config.source}: data.batch_rows {data.batch_rows} is not divisible by the "
                             f"{world} processes")
        self.micro_rows = data.micro_batch_rows or data.batch_rows // world
        if (data.batch_rows // world) % self.micro_rows:
            raise ValueError(f"{config.source}: data.micro_batch_rows {self.micro_rows} does not divide the "
                             f"{data.batch_rows // world} rows of each of the {world} processes (data.batch_rows "
                             f"{data.batch_rows})")

    def _initial_model(self, dtype: torch.dtype, resume_from: Optional[Path]):
        m = self.config.model
        if resume_from is not None or m.init is not None:
            path = resume_from if resume_from is not None else resolve_init(m.init)
            return load_weights(path, dtype=dtype, device=self.env.device, backend=m.backend)
        if isinstance(m.config, dict):
            config = LLaDA2Config.from_dict(dict({"model_type": "llada2_moe"}, **m.config), source="model.config")
        else:
            config = LLaDA2Config.from_file(m.config)
        return parameters_to(random_model(config, seed=m.init_seed, device=self.env.device, backend=m.backend),
                             dtype)

    # ---- one step -------------------------------------------------------------------------------------------

    def _batch(self, picked, phase: Phase, stream: int, first_row: int, t_fixed: Optional[float] = None,
               noise_std: float = 0.0):
        """The rows `picked` [(index in the batch, row)], masked, as one packed batch on the device, and (with
        noise_std) the embedding noise of its MASK tokens [M, H], drawn per row."""
        pairs, noise = [], []
        seed = self.config.run.seed
        for i, row in picked:
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
        batch = collate(pairs)
        return batch, (torch.cat(noise).to(self.env.device) if noise_std else None)

    def _noise(self, noise):
        if noise is None:
            return contextlib.nullcontext()
        return embedding_noise(self.module, mask_id=self.mask_id, noise=noise)

    def _global(self, counts: dict, dtype=torch.float32) -> dict:
        """The counts summed over the processes, in one reduction (in fp64), as `dtype`."""
        names = sorted(counts)
        summed = self.env.total(torch.stack([torch.as_tensor(counts[n], device=self.env.device).double()
                                             for n in names]))
        return dict(zip(names, summed.to(dtype)))

    def _micro_batches(self, picked, phase: Phase, stream: int, first_row: int, **kw):
        chunks = [picked[i:i + self.micro_rows] for i in range(0, len(picked), self.micro_rows)]
        return [self._batch(chunk, phase, stream, first_row, **kw) for chunk in chunks]

    def _flops(self, batch, phase: Phase) -> float:
        """Model FLOPs of the step's calls on `batch` (on the host: no device sync)."""
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
        mask = "block_causal" if phase.objective in ("ar", "mdlm") else "bd3"
        rows = int(ar_targets(batch).sum()) if phase.objective == "ar" else int(batch.masked.sum())
        one = forward_flops(self.module.config, lengths, 1 if phase.objective == "ar" else phase.block_size, mask,
                            rows)
        return one * (4 if phase.objective == "dpo" else 3)

    def backward(self, step: int) -> dict:
        """The forward and backward of step's global batch, micro-batch after micro-batch: the gradients are
        left in the parameters' .grad (times the loss scale under float16); returns this process's sums to log
        (loss, tokens, FLOPs, the objective's metrics), its expert loads [n, E], the fill rate, the number of
        micro-batches and the largest activation memory of one."""
        phase, o, env = self.schedule.phase_at(step), self.config.optim, self.env
        picked, fill = self.train_data.take(self.config.data.batch_rows, env.rank, env.world)
        noise_std = o.embedding_noise_std if step < o.embedding_noise_steps and phase.objective != "ar" else 0.0
        host = self._micro_batches(picked, phase, step, 0, noise_std=noise_std)
        flops = sum(self._flops(batch, phase) for batch, _ in host)
        batches = [(batch.to(env.device), noise) for batch, noise in host]
        counts = {}
        for batch, _ in batches:
            for name, value in batch_counts(batch).items():
                counts[name] = counts.get(name, 0) + value
        if phase.cap_lambda and len(batches) > 1:
            counts["right"] = self._count_right(batches, phase)
        counts = self._global(counts)

        E = self.moe[0][1].gate.expert_bias.numel() if self.moe else 0
        loads = torch.zeros(len(self.moe), E, dtype=torch.float64, device=env.device)
        sums, activation = {"loss": 0.0}, 0
        for index, (batch, noise) in enumerate(batches):
            with distributed.gradient_sync(self.model, index == len(batches) - 1):
                with self._noise(noise), self.meter:
                    terms = objective_terms(self.model, batch, phase, self.reference)
                    if self.moe:
                        loads += routed_counts(self.moe)
                        if o.moe_aux_loss_coef:
                            aux = balance_loss(self.moe, call_cu_seqlens(batch, phase))
                            terms.parts.append((o.moe_aux_loss_coef, aux, "sequences"))
                    if "right" in terms.counts and "right" not in counts:     # one micro-batch: its own count
                        counts = dict(counts, **self._global(terms.counts))
                    loss = combine(terms, counts)
                activation = max(activation, self.meter.bytes)
                self.scaler.scale(loss * env.world).backward()
            clear_routing(self.moe)
            sums["loss"] = sums["loss"] + loss.detach()
            for name, value in terms.metrics.items():
                sums[name] = sums.get(name, 0) + value
        sums.update(tokens=float(sum(len(b.x0) for b, _ in batches)), flops=flops)
        return {"sums": sums, "loads": loads, "fill": fill, "micro_batches": len(batches), "activation": activation}

    def train_step(self, step: int) -> dict:
        phase = self.schedule.phase_at(step)
        lr = self.schedule.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        o, env = self.config.optim, self.env
        done = self.backward(step)
        self.scaler.unscale_(self.optimizer)
        clip = o.grad_clip if o.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

        totals = {k: float(v) for k, v in self._global(done["sums"], torch.float64).items()}
        record = {"step": step + 1, "phase": phase.name, "objective": phase.objective,
                  "block_size": phase.block_size, "lr": lr, "loss": totals["loss"], "grad_norm": float(grad_norm),
                  "tokens": int(totals["tokens"]), "fill": done["fill"], "micro_batches": done["micro_batches"],
                  "activation_mib": done["activation"] / 2**20, **summarize(totals)}
        if self.moe:
            loads = env.total(done["loads"])
            if o.expert_bias_update_rate:
                update_expert_bias(self.moe, loads, o.expert_bias_update_rate)
            record["expert_load"] = load_stats(self.moe, loads)
        if self.scaler.is_enabled():
            record["loss_scale"] = float(self.scaler.get_scale())
        if env.device.type == "cuda":
            record["peak_memory_mib"] = torch.cuda.max_memory_allocated(env.device) / 2**20
            torch.cuda.reset_peak_memory_stats(env.device)
        seconds = time.perf_counter() - start
        record.update(seconds=seconds, tokens_per_s=totals["tokens"] / seconds, tflops=totals["flops"] / 1e12)
        if self.peak:
            record["mfu"] = totals["flops"] / seconds / (self.peak * env.world)
        return record

    @torch.no_grad()
    def _count_right(self, batches, phase: Phase) -> torch.Tensor:
        """CAP's normaliser (masked tokens predicted right) over the micro-batches, counted by a forward of
        each before any gradient is taken: the CAP term of every micro-batch needs the global count."""
        right = 0
        for batch, noise in batches:
            with self._noise(noise):
                logits = diffusion_logits(self.module, batch, phase)
            right = right + cap_entropy(logits, batch.x0[batch.masked])[1]
        clear_routing(self.moe)
        return right

    @torch.no_grad()
    def validate(self, step: int) -> float:
        """The mean over chunks of batch_rows validation rows of each chunk's loss (its counts over the chunk).
        Under FSDP every process makes as many forwards as the one with the most rows (each forward gathers
        the parameters from all of them): a process short of rows makes spare forwards on the chunk's first
        row and drops their terms (a process without a row takes from one the names of its zero counts)."""
        phase = self.schedule.phase_at(step)
        n, losses = self.config.data.batch_rows, []
        env = self.env
        for first in range(0, len(self.valid_rows), n):
            rows = self.valid_rows[first:first + n]
            picked = [(i, rows[i]) for i in range(env.rank, len(rows), env.world)]
            batches = self._micro_batches(picked, phase, VALID_STREAM, first, t_fixed=self.config.run.valid_t)
            forwards = -(-(-(-len(rows) // env.world)) // self.micro_rows) if self.sharded else len(batches)
            spare = self._micro_batches([(0, rows[0])], phase, VALID_STREAM, first)[0][0]
            numerators, counts = {}, {}
            for index in range(max(forwards, 1)):
                batch = (batches[index][0] if index < len(batches) else spare).to(env.device)
                terms = objective_terms(self.module, batch, phase, self.reference)
                if index >= len(batches):
                    if not counts:
                        counts = {name: 0.0 for name in dict(batch_counts(batch), **terms.counts)}
                    continue
                for c, num, name in terms.parts:
                    numerators[(c, name)] = numerators.get((c, name), 0) + num
                for name, value in dict(batch_counts(batch), **terms.counts).items():
                    counts[name] = counts.get(name, 0) + value
            counts = self._global(counts)
            local = sum(c * num / counts[name].clamp(min=1.0) for (c, name), num in numerators.items())
            losses.append(float(env.total(torch.as_tensor(float(local), device=env.device).float()).item()))
        clear_routing(self.moe)
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
        if self.scaler.is_enabled():
            state["grad_scaler"] = self.scaler.state_dict()
        path = save_checkpoint(self.out, step, self.module, self.optimizer, state, self.tokenizer_file,
                               sharded=self.sharded, rank=self.env.rank, release_dtype=self.compute_dtype)
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
                postfix = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_s']:.0f}",
                           "fill": f"{record['fill']:.0%}", "phase": record["phase"]}
                if "expert_load" in record:
                    postfix["moe"] = worst_layer(record["expert_load"])
                bar.set_postfix(postfix, refresh=False)
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

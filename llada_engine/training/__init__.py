"""Training (docs/ARCHITECTURE.md, Training): the LLaDA2.0 recipe that turns an AR model into a block-diffusion model.

    data.py             documents -> tokens -> fixed-length rows of varlen sequences, resumable order
    prepare_data.py     `llada-engine prepare-data`: documents tokenized once into memory-mapped token shards
    noise.py            per-sequence mask ratio, band and complementary masks
    losses.py           ar, bdlm, mdlm, CAP, DPO on a packed batch
    schedule.py         phases and the warmup-stable-decay learning rate
    embedding_noise.py  Gaussian noise on MASK embeddings for the first steps
    config.py           the YAML / JSON run configuration
    trainer.py          the loop: micro-batches, AdamW, clipping, validation, metrics, loss curve, checkpoints,
                        resume
    precision.py        fp32 master weights with the compute in model.dtype (one process, DDP, FSDP2)
    moe_balance.py      expert-bias balancing, the sequence-wise balance loss, expert-load statistics
    memory.py           activation checkpointing of the decoder layers, and the activation-memory meter
    flops.py            model FLOPs of a step and the peak for MFU
    checkpoint.py       atomic checkpoints in the release format plus optimizer / RNG / data position
    distributed.py      torchrun process groups, DDP, FSDP2
    merge.py            top-k checkpoint averaging
    plot.py             the loss curve (matplotlib)
"""
from .config import RunConfig, load_config
from .merge import merge_checkpoints, top_k_by_valid_loss
from .schedule import Phase, Schedule
from .trainer import Trainer, train

__all__ = ["Phase", "RunConfig", "Schedule", "Trainer", "load_config", "merge_checkpoints", "top_k_by_valid_loss",
           "train"]

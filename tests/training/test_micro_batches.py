"""Micro-batches and activation checkpointing change memory, not the step: the loss, the metrics, the expert
loads and every gradient of a step in micro-batches (the objective's counts taken over the whole global
batch) or with each decoder layer recomputed in the backward equal those of the plain step, for every
objective with its options (complementary masks, mask band, CAP, embedding noise, the MoE balance loss);
checkpointing cuts the activation memory the backward holds."""
import pytest
import torch

from llada_engine.training import train
from llada_engine.training.config import config_from_dict
from llada_engine.training.trainer import Trainer
from training_testing import dpo_corpus, run_config, small_checkpoint, text_corpus

pytestmark = pytest.mark.kernels

PHASES = {
    "bdlm": {"objective": "bdlm", "steps": 1, "block_size": 4, "complementary": True, "mask_band": [0.2, 0.8],
             "cap_lambda": 0.5},
    "mdlm": {"objective": "mdlm", "steps": 1, "weighting": "mean", "cap_lambda": 0.5},
    "ar": {"objective": "ar", "steps": 1},
    "dpo": {"objective": "dpo", "steps": 1, "block_size": 8},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    ckpt, _, _ = small_checkpoint(root / "ckpt", seed=2)
    text = text_corpus(root / "train.txt", n=80)
    warm = run_config(root / "warm", init=ckpt, train=text, optim={"lr": 1e-2},   # CAP needs some right predictions
                      phases=[{"objective": "bdlm", "steps": 15, "block_size": 4}])
    return root, train(config_from_dict(warm)), text, dpo_corpus(root / "dpo.jsonl", n=24)


def one_step(tmp, setup, objective, **sections):
    root, ckpt, text, dpo = setup
    config = run_config(tmp, init=ckpt, train=dpo if objective == "dpo" else text, phases=[PHASES[objective]],
                        optim={"embedding_noise_std": 0.3, "embedding_noise_steps": 1, "moe_aux_loss_coef": 0.1})
    config["data"]["batch_rows"] = 4
    for name, values in sections.items():
        config[name].update(values)
    trainer = Trainer(config_from_dict(config))
    done = trainer.backward(0)
    sums = {k: float(v) for k, v in trainer._global(done["sums"], torch.float64).items()}
    grads = {n: p.grad.clone() for n, p in trainer.module.named_parameters()}
    trainer.close()
    return sums, done, grads


@pytest.mark.parametrize("objective", list(PHASES))
def test_micro_batched_and_checkpointed_steps_equal_the_plain_step(tmp_path, setup, objective):
    want, plain, want_grads = one_step(tmp_path / "plain", setup, objective)
    assert plain["micro_batches"] == 1 and want["loss"] > 0
    runs = {"micro 1": one_step(tmp_path / "m1", setup, objective, data={"micro_batch_rows": 1}),
            "micro 2 + checkpointing": one_step(tmp_path / "m2", setup, objective, data={"micro_batch_rows": 2},
                                                run={"activation_checkpointing": True}),
            "checkpointing": one_step(tmp_path / "ac", setup, objective, run={"activation_checkpointing": True})}
    for name, (got, done, grads) in runs.items():
        assert done["micro_batches"] == {"micro 1": 4, "micro 2 + checkpointing": 2, "checkpointing": 1}[name]
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
        assert torch.equal(done["loads"], plain["loads"]), name
        for param, grad in want_grads.items():
            torch.testing.assert_close(grads[param], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {param}")
    if "cap_lambda" in PHASES[objective]:
        assert want["right"] > 0
    _, checkpointed, _ = runs["checkpointing"]
    assert checkpointed["activation"] < 0.6 * plain["activation"], (checkpointed["activation"], plain["activation"])


def test_micro_batch_rows_must_divide_each_process_share(tmp_path, setup):
    with pytest.raises(ValueError, match=r"data.micro_batch_rows 3 does not divide the 4 rows"):
        one_step(tmp_path, setup, "ar", data={"micro_batch_rows": 3})


def test_no_gradient_reduction_before_the_last_micro_batch(tmp_path):
    """gradient_sync on a one-process gloo group: DDP reduces (its comm hook runs) only in the last backward;
    FSDP2 leaves the sharded gradients unset until the last backward reduces them."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from llada_engine.training.distributed import gradient_sync

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        reductions = []

        def hook(state, bucket):
            reductions.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        inputs = [torch.randn(3, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        ddp = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)))
        ddp.register_comm_hook(None, hook)
        for i, x in enumerate(inputs):
            with gradient_sync(ddp, i == len(inputs) - 1):
                ddp(x).sum().backward()
            assert bool(reductions) == (i == len(inputs) - 1), (i, reductions)

        fsdp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        fully_shard(fsdp[0])
        fully_shard(fsdp)
        for i, x in enumerate(inputs):
            with gradient_sync(fsdp, i == len(inputs) - 1):
                fsdp(x).sum().backward()
            assert all((p.grad is not None) == (i == len(inputs) - 1) for p in fsdp.parameters()), i
    finally:
        dist.destroy_process_group()

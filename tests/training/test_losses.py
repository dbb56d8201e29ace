"""The objectives against direct computations: every sequence alone through an independent statement of the
official forward (tests/official_llada2.py) under a dense mask built here by hand, cross-entropies summed in
a loop. Covers bdlm (elbo and mean, two block sizes, both backends), mdlm, ar, CAP and DPO (its formula, its
reward metrics, and gradients that reach only the policy)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llada_engine
from llada_engine.training.data import CHOSEN, PADDING, PLAIN, REJECTED, Row
from llada_engine.training.losses import cap_entropy, collate, diffusion_logits, objective_loss, summarize
from llada_engine.training.noise import mask_row
from llada_engine.training.schedule import Phase
from official_llada2 import official_forward
from training_testing import MASK, small_checkpoint

identity = lambda x: x  # noqa: E731  (the global sum of one process)


def bd3_keep(n: int, block: int) -> torch.Tensor:
    """[x_t | x_0] mask of one sequence of n tokens, written out entry by entry."""
    keep = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for i in range(2 * n):
        for j in range(2 * n):
            bi, bj = (i % n) // block, (j % n) // block
            if i < n:
                keep[i, j] = (j < n and bi == bj) or (j >= n and bj < bi)
            else:
                keep[i, j] = j >= n and bj <= bi
    return keep


def rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, 93, (n,), generator=g).numpy()  # noqa: E731
    plain = Row(np.concatenate([ids(10), ids(14), ids(8)]), [10, 14, 8], [0, 0, 0], [PLAIN] * 3)
    sft = Row(np.concatenate([ids(12), ids(16), np.full(4, 94)]), [12, 16, 4], [4, 5, 0], [PLAIN, PLAIN, PADDING])
    return [plain, sft]


def noisy_batch(rs, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    return collate([(r, n) for r in rs for n in mask_row(r, g, mask_id=MASK, t_min=0.2, t_max=0.9, **kw)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("losses"), seed=3)


def sequences(batch):
    cu = batch.cu_seqlens.tolist()
    return [slice(cu[s], cu[s + 1]) for s in range(len(cu) - 1)]


def direct_diffusion(sd, cfg, batch, block, weighting, bd3=True):
    total, trainable, masked = 0.0, int(batch.trainable.sum()), int(batch.masked.sum())
    for s in sequences(batch):
        n = s.stop - s.start
        xt, x0, m, t = batch.xt[s], batch.x0[s], batch.masked[s], batch.t[s]
        if bd3:
            logits = official_forward(sd, cfg, torch.cat([xt, x0]), block, keep=bd3_keep(n, block),
                                      positions=torch.cat([torch.arange(n), torch.arange(n)]))[:n]
        else:
            logits = official_forward(sd, cfg, xt, block)
        for i in range(n):
            if m[i]:
                ce = F.cross_entropy(logits[i], x0[i]).item()
                total += ce / t[i].item() if weighting == "elbo" else ce
    return total / (trainable if weighting == "elbo" else masked)


@pytest.mark.parametrize("backend", ["reference", "kernels"])
@pytest.mark.parametrize("block,weighting", [(4, "elbo"), (8, "mean")])
def test_bdlm_loss_equals_direct_computation(tiny, backend, block, weighting):
    path, cfg, sd = tiny
    model = llada_engine.load_model(path, backend=backend)
    batch = noisy_batch(rows())
    assert batch.masked.any() and not (batch.masked & ~batch.trainable).any()
    phase = Phase("bdlm", 1, block, 1e-3, weighting=weighting)
    loss, _ = objective_loss(model, batch, phase, identity)
    assert loss.item() == pytest.approx(direct_diffusion(sd, cfg, batch, block, weighting), rel=1e-4)


def test_mdlm_loss_equals_direct_computation(tiny):
    path, cfg, sd = tiny
    model = llada_engine.load_model(path, backend="reference")
    batch = noisy_batch(rows(2), seed=5)
    loss, _ = objective_loss(model, batch, Phase("mdlm", 1, 32, 1e-3), identity)
    assert loss.item() == pytest.approx(direct_diffusion(sd, cfg, batch, 32, "elbo", bd3=False), rel=1e-4)


@pytest.mark.kernels
def test_ar_loss_equals_direct_computation(tiny):
    path, cfg, sd = tiny
    model = llada_engine.load_model(path)
    batch = noisy_batch(rows())
    loss, _ = objective_loss(model, batch, Phase("ar", 1, 1, 1e-3), identity)
    total, count = 0.0, 0
    for s in sequences(batch):
        x0, train = batch.x0[s], batch.trainable[s]
        logits = official_forward(sd, cfg, x0, 1)
        for i in range(len(x0) - 1):
            if train[i + 1]:
                total += F.cross_entropy(logits[i], x0[i + 1]).item()
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


@pytest.mark.kernels
def test_cap_is_the_mean_entropy_of_right_predictions(tiny):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 11, generator=g) * 3
    target = torch.randint(0, 11, (20,), generator=g)
    target[::2] = logits[::2].argmax(-1)
    entropies = [-(F.softmax(logits[i], -1) * F.log_softmax(logits[i], -1)).sum().item()
                 for i in range(20) if logits[i].argmax() == target[i]]
    entropy, right = cap_entropy(logits, target)
    assert right.item() == len(entropies) and entropy.item() == pytest.approx(sum(entropies), rel=1e-5)

    path, cfg, sd = tiny
    model = llada_engine.load_model(path)
    batch = noisy_batch(rows())
    mdlm = Phase("mdlm", 1, 32, 1e-3)
    logits = diffusion_logits(model, batch, mdlm)            # x_0 is not an input of mdlm: make half the targets
    x0 = batch.x0.clone()                                    # the model's own predictions
    where = batch.masked.nonzero().squeeze(1)[::2]
    x0[where] = logits.argmax(-1)[::2]
    batch.x0 = x0
    base, _ = objective_loss(model, batch, mdlm, identity)
    with_cap, metrics = objective_loss(model, batch, Phase("mdlm", 1, 32, 1e-3, cap_lambda=0.3), identity)
    entropy, right = cap_entropy(logits, batch.x0[batch.masked])
    assert right >= len(where) > 0 and metrics["right"] == right
    assert with_cap.item() == pytest.approx(base.item() + 0.3 * entropy.item() / right.item(), rel=1e-5)


@pytest.mark.kernels
def test_dpo_equals_its_formula_and_only_the_policy_gets_gradients(tmp_path, tiny):
    path, cfg, sd = tiny
    ref_path, _, ref_sd = small_checkpoint(tmp_path / "ref", seed=9)
    policy = llada_engine.load_model(path).train()
    reference = llada_engine.load_model(ref_path)          # requires_grad left on: no_grad must stop it
    g = torch.Generator().manual_seed(4)
    ids = lambda n: torch.randint(0, 93, (n,), generator=g).numpy()  # noqa: E731
    row = Row(np.concatenate([ids(8), ids(9), ids(7), ids(6), np.full(2, 94)]), [8, 9, 7, 6, 2], [3, 3, 2, 2, 0],
              [CHOSEN, REJECTED, CHOSEN, REJECTED, PADDING])
    batch = collate([(row, n) for n in mask_row(row, g, mask_id=MASK, t_min=0.3, t_max=0.9)])
    phase = Phase("dpo", 1, 4, 1e-3, beta=0.1)
    loss, metrics = objective_loss(policy, batch, phase, identity, reference)

    def elbo(state, s):
        n = s.stop - s.start
        logits = official_forward(state, cfg, torch.cat([batch.xt[s], batch.x0[s]]), 4, keep=bd3_keep(n, 4),
                                  positions=torch.cat([torch.arange(n), torch.arange(n)]))[:n]
        return -sum(F.cross_entropy(logits[i], batch.x0[s][i]).item() / batch.t[s][i].item()
                    for i in range(n) if batch.masked[s][i])

    seqs = sequences(batch)
    want, chosen, rejected = 0.0, [], []
    for w, l in ((seqs[0], seqs[1]), (seqs[2], seqs[3])):
        chosen.append(0.1 * (elbo(sd, w) - elbo(ref_sd, w)))
        rejected.append(0.1 * (elbo(sd, l) - elbo(ref_sd, l)))
        want += -math.log(1 / (1 + math.exp(-(chosen[-1] - rejected[-1]))))
    assert loss.item() == pytest.approx(want / 2, rel=1e-4)
    logged = summarize(metrics)
    assert logged["pairs"] == 2
    assert logged["reward_chosen"] == pytest.approx(np.mean(chosen), rel=1e-4, abs=1e-6)
    assert logged["reward_rejected"] == pytest.approx(np.mean(rejected), rel=1e-4, abs=1e-6)
    assert logged["reward_margin"] == pytest.approx(np.mean(chosen) - np.mean(rejected), rel=1e-4, abs=1e-6)
    assert logged["reward_accuracy"] == np.mean([c > r for c, r in zip(chosen, rejected)])
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert sum(p.grad.abs().sum().item() for p in policy.parameters() if p.grad is not None) > 0


@pytest.mark.kernels
def test_every_parameter_gets_the_reference_gradient(tiny):
    """The router included: the kernels backend trains what the pure-PyTorch reference trains."""
    path, _, _ = tiny
    batch = noisy_batch(rows())
    grads = {}
    for backend in ("kernels", "reference"):
        model = llada_engine.load_model(path, backend=backend).train()
        loss, _ = objective_loss(model, batch, Phase("bdlm", 1, 4, 1e-3), identity)
        loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    for name, ref in grads["reference"].items():
        assert grads["kernels"][name] is not None, name
        torch.testing.assert_close(grads["kernels"][name], ref, rtol=1e-4, atol=1e-5, msg=name)

"""Masking: prompts and padding never masked, Bernoulli masking at rate t, the mask-ratio band, and
complementary masks that mask every trainable token exactly once across the pair."""
import numpy as np
import pytest
import torch

from llada_engine.training.data import PADDING, PLAIN, Row
from llada_engine.training.noise import mask_row, trainable
from training_testing import MASK


def sft_row(lengths=(30, 9, 50, 5), prompts=(10, 3, 20, 0), pad=6):
    tokens = np.arange(sum(lengths) + pad) % 90
    return Row(tokens, list(lengths) + [pad], list(prompts) + [0], [PLAIN] * len(lengths) + [PADDING])


def test_trainable_excludes_prompts_and_padding():
    row = sft_row()
    train = trainable(row)
    assert train.tolist() == [False] * 10 + [True] * 20 + [False] * 3 + [True] * 6 + [False] * 20 + [True] * 30 + \
        [True] * 5 + [False] * 6


@pytest.mark.parametrize("band", [(0.2, 0.8), (0.3, 0.7), (0.5, 0.5)])
def test_band_and_complementary_masks(band):
    row = sft_row()
    train = trainable(row)
    starts = np.cumsum([0] + row.lengths)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        first, second = mask_row(row, g, mask_id=MASK, t_min=0.0, t_max=1.0, band=band, complementary=True)
        assert not (first.masked & second.masked).any()
        assert torch.equal(first.masked | second.masked, train)          # every trainable token exactly once
        for noisy in (first, second):
            assert torch.equal(noisy.xt[noisy.masked], torch.full((int(noisy.masked.sum()),), MASK))
            assert torch.equal(noisy.xt[~noisy.masked], noisy.x0[~noisy.masked])
            for s in range(len(row.lengths)):
                part = slice(starts[s], starts[s + 1])
                n = int(train[part].sum())
                if n == 0:
                    continue
                ratio = noisy.masked[part].sum().item() / n
                assert ratio == pytest.approx(noisy.t[part][0].item())
                if np.ceil(band[0] * n - 1e-9) <= np.floor(band[1] * n + 1e-9):
                    assert band[0] - 1e-9 <= ratio <= band[1] + 1e-9, (s, n, ratio)
        assert torch.allclose(first.t + second.t, torch.ones_like(first.t))


def test_bernoulli_rate_is_t():
    row = Row(np.zeros(20000, dtype=np.int64), [20000], [0], [PLAIN])
    noisy, = mask_row(row, torch.Generator().manual_seed(0), mask_id=MASK, t_min=0.3, t_max=0.3)
    assert noisy.masked.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.all(noisy.t == 0.3)


def test_band_ratio_is_drawn_inside_the_band_not_piled_on_its_edges():
    row = Row(np.arange(101) % 90, [101], [1], [PLAIN])                        # 100 trainable tokens
    ratios = []
    for seed in range(400):
        noisy, = mask_row(row, torch.Generator().manual_seed(seed), mask_id=MASK, t_min=0.0, t_max=1.0,
                          band=(0.1, 0.9))
        ratios.append(noisy.masked.sum().item() / 100)
    ratios = np.array(ratios)
    assert ratios.min() >= 0.1 and ratios.max() <= 0.9
    assert np.mean((ratios == 0.1) | (ratios == 0.9)) < 0.02                    # clipping put 20 % there
    assert np.histogram(ratios, bins=4, range=(0.1, 0.9))[0].min() > 70        # about uniform: 100 a bin


def test_band_outside_the_ratio_range_is_an_error():
    with pytest.raises(ValueError, match=r"mask_band \(0\.6, 0\.9\) does not meet"):
        mask_row(sft_row(), torch.Generator(), mask_id=MASK, t_min=0.0, t_max=0.5, band=(0.6, 0.9))

"""Gaussian noise on MASK embeddings: row m of the noise lands on the m-th MASK token, nothing else moves,
nothing moves outside the block, and a count mismatch is a clear error."""
import pytest
import torch

import llada_engine
from llada_engine.training.embedding_noise import embedding_noise
from training_testing import MASK, small_checkpoint


def test_noise_lands_on_mask_embeddings_in_order(tmp_path):
    path, _, _ = small_checkpoint(tmp_path)
    model = llada_engine.load_model(path)
    ids = torch.randint(0, 90, (40,), generator=torch.Generator().manual_seed(0))
    ids[::3] = MASK
    noise = torch.randn(int((ids == MASK).sum()), model.config.hidden_size)
    clean = model.model.word_embeddings(ids)
    with embedding_noise(model, mask_id=MASK, noise=noise):
        noisy = model.model.word_embeddings(ids)
        with pytest.raises(ValueError, match="the input holds 13 MASK tokens but 14 were masked"):
            model.model.word_embeddings(ids[:-1])                   # position 39 is a MASK
    expected = clean.clone()
    expected[::3] += noise
    torch.testing.assert_close(noisy, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.model.word_embeddings(ids), clean, rtol=0, atol=0)

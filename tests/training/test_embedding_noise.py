"""Gaussian noise on MASK embeddings: only MASK positions move, by N(0, std^2), and only inside the block."""
import torch

import llada_engine
from llada_engine.training.embedding_noise import embedding_noise
from training_testing import MASK, small_checkpoint


def test_noise_only_on_mask_embeddings(tmp_path):
    path, _, _ = small_checkpoint(tmp_path)
    model = llada_engine.load_model(path)
    ids = torch.randint(0, 90, (4000,), generator=torch.Generator().manual_seed(0))
    ids[::2] = MASK
    clean = model.model.word_embeddings(ids)
    with embedding_noise(model, mask_id=MASK, std=0.5, generator=torch.Generator().manual_seed(1)):
        noisy = model.model.word_embeddings(ids)
    diff = noisy - clean
    assert torch.equal(diff[1::2], torch.zeros_like(diff[1::2]))
    assert abs(diff[::2].std().item() - 0.5) < 0.01
    torch.testing.assert_close(model.model.word_embeddings(ids), clean, rtol=0, atol=0)

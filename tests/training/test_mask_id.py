"""Training needs a MASK id: a model whose config.json has none (as the release's has none) is refused when
the run starts, naming the file and how to give one, before any step runs."""
import json

import pytest

from llada_engine.training import load_config, train
from training_testing import run_config, small_checkpoint, text_corpus, write_config


@pytest.mark.parametrize("mask_token_id", [None, 96, 94])
def test_a_model_without_a_usable_mask_id_is_refused(tmp_path, mask_token_id):
    ckpt, cfg, _ = small_checkpoint(tmp_path / "ckpt", seed=0)
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, mask_token_id=mask_token_id)))
    config = run_config(tmp_path, init=ckpt, train=text_corpus(tmp_path / "train.txt", n=8),
                        phases=[{"objective": "bdlm", "block_size": 8, "steps": 1}], model={"backend": "reference"})
    with pytest.raises(ValueError, match=rf"mask_token_id {mask_token_id} of {ckpt}/config.json is not a MASK id the "
                                         rf"model can train with \(a token id in \[0, 96\) other than EOS\); set "
                                         rf"\"mask_token_id\" there \(LLaDA2.0 releases use 156895\)"):
        train(load_config(write_config(tmp_path / "run.yaml", config)))
    assert not (tmp_path / "run" / "checkpoints").exists()

"""Training needs a MASK id: a model whose config.json has none (as the release's has none) is refused when
the run starts, naming the file and how to give one, before any step runs; so is an EOS or padding id
outside the vocabulary."""
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


@pytest.mark.parametrize("key,what", [("eos_token_id", "an EOS id"), ("pad_token_id", "a padding id")])
@pytest.mark.parametrize("value", [None, 96, 156892])
def test_eos_and_padding_ids_must_be_inside_the_vocabulary(tmp_path, key, what, value):
    ckpt, cfg, _ = small_checkpoint(tmp_path / "ckpt", seed=0)
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, **{key: value})))
    config = run_config(tmp_path, init=ckpt, train=text_corpus(tmp_path / "train.txt", n=8),
                        phases=[{"objective": "bdlm", "block_size": 8, "steps": 1}], model={"backend": "reference"})
    with pytest.raises(ValueError, match=rf"{key} {value} of {ckpt}/config.json is not {what} \(a token id in "
                                         rf"\[0, 96\)\); set \"{key}\" there$"):
        train(load_config(write_config(tmp_path / "run.yaml", config)))
    assert not (tmp_path / "run" / "checkpoints").exists()

"""Run configurations: the shipped WSD recipe changes block size at the right steps (up, then down through
intermediate sizes), the learning rate is
warmup-stable-decay, the tiny recipe configs parse, and bad configs name the file and the key."""
from pathlib import Path

import pytest

from llada_engine.training import load_config
from llada_engine.training.config import config_from_dict, parse_overrides
from training_testing import write_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_wsd_recipe_changes_block_size_at_the_right_steps():
    config = load_config(CONFIGS / "wsd_conversion.yaml")
    schedule, full = config.schedule, config.data.row_length
    expected = [("bdlm", 1, 1000), ("bdlm", 4, 1000), ("bdlm", 32, 1000), ("bdlm", 64, 1000), ("bdlm", full, 1000),
                ("mdlm", full, 10000), ("bdlm", 1024, 1000), ("bdlm", 256, 1000), ("bdlm", 64, 1000),
                ("bdlm", 32, 2000)]
    assert [(p.objective, p.block_size, p.steps) for p in schedule.phases] == expected
    start = 0
    for objective, block, steps in expected:
        for step in (start, start + steps - 1):
            phase = schedule.phase_at(step)
            assert (phase.objective, phase.block_size) == (objective, block), step
        start += steps
    assert schedule.total_steps == start
    with pytest.raises(ValueError, match="outside the run"):
        schedule.phase_at(start)


def test_learning_rate_is_warmup_stable_decay():
    config = load_config(CONFIGS / "wsd_conversion.yaml")
    s, peak = config.schedule, config.optim.lr
    assert s.lr_at(0) == pytest.approx(peak / 500)
    assert s.lr_at(499) == pytest.approx(peak)
    assert s.lr_at(10000) == pytest.approx(peak)
    total = s.total_steps
    assert s.lr_at(total - 2001) == pytest.approx(peak)
    assert s.lr_at(total - 1000) == pytest.approx(peak * (1 - 1001 / 2000 * 0.9))
    assert s.lr_at(total - 1) == pytest.approx(peak * 0.1)
    lrs = [s.lr_at(i) for i in range(total)]
    assert all(a <= b for a, b in zip(lrs[:500], lrs[1:500])) and all(a >= b for a, b in zip(lrs[-2000:], lrs[-1999:]))


@pytest.mark.parametrize("name", ["ar_pretrain.yaml", "wsd_conversion.yaml", "sft.yaml", "dpo.yaml"])
def test_tiny_recipe_configs_parse(name):
    config = load_config(CONFIGS / "tiny" / name)
    assert config.data.row_length == 256 and config.schedule.total_steps > 0
    if name == "wsd_conversion.yaml":
        assert [p.block_size for p in config.schedule.phases] == [1, 4, 32, 64, 256, 256, 128, 64, 32]


def test_overrides():
    config = load_config(CONFIGS / "wsd_conversion.yaml",
                         parse_overrides(["run.out_dir=/tmp/x", "data.row_length=2048", "optim.lr=1e-4"]))
    assert config.run.out_dir == "/tmp/x" and config.data.row_length == 2048
    assert config.schedule.phases[5].block_size == 2048 and config.schedule.phases[0].lr == 1e-4


def good():
    return {"model": {"init": "ckpt"}, "data": {"train": "t.txt", "row_length": 64},
            "phases": [{"objective": "bdlm", "steps": 2, "block_size": 8}]}


@pytest.mark.parametrize("change,message", [
    (lambda c: c["phases"][0].update(block_size=12), r"phases\[0\]\.block_size: 12 does not divide data.row_length 64"),
    (lambda c: c["phases"][0].update(objective="gan"), r"phases\[0\]\.objective: must be one of"),
    (lambda c: c["phases"][0].pop("steps"), r"phases\[0\]\.steps: missing"),
    (lambda c: c["phases"][0].update(t_min=0.9, t_max=0.1), r"t_min/t_max"),
    (lambda c: c["phases"][0].update(mask_band=[0.8, 0.2]), r"mask_band"),
    (lambda c: c["phases"][0].update(objective="mdlm", block_size=32), r"objective 'mdlm' covers the whole document"),
    (lambda c: c["phases"][0].update(objective="ar", block_size=8), r"objective 'ar' is causal"),
    (lambda c: c["phases"][0].update(weighting="sum"), r"weighting: must be one of"),
    (lambda c: c["phases"][0].update(colour="red"), r"phases\[0\]\.colour: unknown key"),
    (lambda c: c["data"].update(rows=3), r"data\.rows: unknown key"),
    (lambda c: c["data"].update(row_length="long"), r"data\.row_length: must be a number"),
    (lambda c: c.update(extra={}), r"extra: unknown section"),
    (lambda c: c["data"].pop("train"), r"data\.train: missing"),
    (lambda c: c["model"].update(config="c.json"), r"model: give exactly one of model.init"),
    (lambda c: c.update(phases=[]), r"phases: must be a non-empty list"),
    (lambda c: c.update(optim={"warmup_steps": 2, "decay_steps": 1}), r"exceed the run's 2 steps"),
    (lambda c: c.update(run={"eval_every": 5}), r"run\.eval_every: needs data\.valid"),
    (lambda c: c.update(run={"parallel": "zero3"}), r"run\.parallel: must be one of"),
    (lambda c: c.update(run={"device": "gpu"}), r"run\.device: must be one of"),
])
def test_bad_configs_name_the_key(tmp_path, change, message):
    raw = good()
    change(raw)
    with pytest.raises(ValueError, match=message):
        load_config(write_config(tmp_path / "bad.yaml", raw))
    config_from_dict(good())


def test_missing_and_unreadable_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such config file"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "broken.yaml").write_text("phases: [\n")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML"):
        load_config(tmp_path / "broken.yaml")

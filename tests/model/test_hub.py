"""Hugging Face Hub ids: a model not yet cached downloads (from a stand-in Hub on 127.0.0.1) into the cache
that HF_HOME names, laid out by huggingface_hub itself; with HF_HUB_OFFLINE=1 it then loads from that cache,
each `revision` its own weights, through load_model, load_tokenizer and the CLI; a local folder of the same
spelling wins over the Hub; an id in neither place is a clear error saying where it looked. Each case runs in
a fresh process, since huggingface_hub reads its environment once, at import."""
import json
import os
import subprocess
import sys

import pytest
from huggingface_hub import scan_cache_dir

import llada_engine
from hub_testing import FakeHub
from model_testing import tiny_checkpoint

FINGERPRINT = ("import json, sys, llada_engine\n"
               "def fingerprint(model): return float(model.lm_head.weight.double().sum())\n")


def python(code: str, env: dict, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def weights_sum(sd) -> float:
    return float(sd["lm_head.weight"].double().sum())


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    main = tiny_checkpoint(root / "main", seed=21, mask_token_id=None)
    v2 = tiny_checkpoint(root / "v2", seed=22)
    return root, {"main": main, "v2": v2}


def test_download_then_offline_load_per_revision(releases, tmp_path):
    root, revs = releases
    hf_home = tmp_path / "hf"
    load = FINGERPRINT + ("print(json.dumps([[fingerprint(llada_engine.load_model('org/tiny', revision=r, "
                          "backend='reference')), llada_engine.load_tokenizer('org/tiny', revision=r).get_vocab_size()]"
                          " for r in (None, 'v2')]))")
    with FakeHub({"org/tiny": {"main": revs["main"][0], "v2": revs["v2"][0]}}) as hub:
        online = python(load, hub.environ(hf_home))
        assert online.returncode == 0, online.stderr
        assert any(r.startswith("GET /org/tiny/resolve/") for r in hub.requests)
        offline = dict(hub.environ(hf_home), HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # nobody there
    cached = {repo.repo_id: repo for repo in scan_cache_dir(hf_home / "hub").repos}
    assert set(cached) == {"org/tiny"}
    assert {ref for rev in cached["org/tiny"].revisions for ref in rev.refs} == {"main", "v2"}

    proc = python(load, offline)
    assert proc.returncode == 0, proc.stderr
    (main, main_vocab), (v2, v2_vocab) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert main == pytest.approx(weights_sum(revs["main"][2]), rel=1e-12)
    assert v2 == pytest.approx(weights_sum(revs["v2"][2]), rel=1e-12)
    assert main_vocab == v2_vocab == llada_engine.load_tokenizer(revs["v2"][0]).get_vocab_size()

    cli = subprocess.run([sys.executable, "-m", "llada_engine.cli", "generate", "--model", "org/tiny", "--revision",
                          "v2", "--backend", "reference", "--gen-length", "8", "--block-length", "8", "ab"],
                         env=dict(os.environ, **offline), capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "TPF" in cli.stdout, cli.stderr


def test_missing_id_says_it_looked_in_the_cache_and_could_not_download(releases, tmp_path):
    root, revs = releases
    code = ("import llada_engine\n"
            "try:\n    llada_engine.load_model('org/absent')\n"
            "except FileNotFoundError as error:\n    print(error)\n")
    offline = python(code, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert (f"org/absent: no such local folder, and as a Hugging Face Hub id (revision main) it is not in the cache "
            f"{tmp_path / 'hf' / 'hub'} and could not be downloaded (HF_HUB_OFFLINE is set)") in offline.stdout
    with FakeHub({"org/tiny": {"main": revs["main"][0]}}) as hub:
        online = python(code, hub.environ(tmp_path / "hf"))
    assert "org/absent: no such local folder" in online.stdout and "could not be downloaded (" in online.stdout


def test_a_local_folder_wins_over_a_hub_id(releases, tmp_path):
    root, revs = releases
    _, _, local_sd = tiny_checkpoint(tmp_path / "org" / "tiny", seed=23)
    with FakeHub({"org/tiny": {"main": revs["main"][0]}}) as hub:
        proc = python(FINGERPRINT + "print(fingerprint(llada_engine.load_model('org/tiny', backend='reference')))",
                      hub.environ(tmp_path / "hf"), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert hub.requests == []
    assert float(proc.stdout.split()[-1]) == pytest.approx(weights_sum(local_sd), rel=1e-12)


def test_revision_applies_to_hub_ids_only(releases):
    root, revs = releases
    with pytest.raises(ValueError, match="revision: .* is a local folder; revision applies to Hugging Face Hub ids"):
        llada_engine.load_model(revs["main"][0], revision="v2")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        llada_engine.load_model(root / "not" / "there")   # a pathlib.Path is never a Hub id

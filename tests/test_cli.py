"""`llada-engine generate` end to end on a tiny checkpoint with its own tokenizer: streamed text, a stats line,
prompts from a file decoded as one batch, the chat format, and a clear error for a missing checkpoint;
`llada-engine bench` on the same checkpoint."""
import json
import subprocess
import sys

import pytest

from model_testing import tiny_checkpoint

pytestmark = pytest.mark.kernels


def run_cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "llada_engine.cli", *args], capture_output=True, text=True,
                          check=check, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cli"), seed=3)[0]


def test_generate_streams_text_and_stats(checkpoint):
    out = run_cli("generate", "--model", str(checkpoint), "--gen-length", "24", "--block-length", "8", "ROMEO:").stdout
    lines = out.strip().splitlines()
    assert lines[-1].startswith("[") and "tokens/s" in lines[-1] and "TPF" in lines[-1]
    assert len("".join(lines[:-1])) > 0


def test_generate_batch_from_file_and_chat(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond one\n")
    out = run_cli("generate", "--model", str(checkpoint), "--prompts-file", str(prompts), "--chat",
                  "--gen-length", "16", "--block-length", "8", "--steps", "4", "--no-cache").stdout
    assert "=== 0: <role>HUMAN</role>first prompt<|role_end|><role>ASSISTANT</role>" in out
    assert "=== 1: " in out and "second one" in out and "TPF" in out


def test_generate_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = run_cli("generate", "--model", str(tmp_path / "none"), "hi", check=False)
    assert proc.returncode != 0 and "no such checkpoint folder" in proc.stderr


def test_bench_times_cached_and_uncached_decoding(checkpoint):
    out = run_cli("bench", "--model", str(checkpoint), "--batch", "1", "3", "--prompt-length", "9", "--gen-length",
                  "16", "--block-length", "8").stdout
    record = json.loads(out.strip().splitlines()[-1])
    assert record["benchmark"] == "generate" and [r["batch"] for r in record["rows"]] == [1, 3]
    for row in record["rows"]:
        assert row["identical"] and row["tokens"] > 0 and row["cached_tok_s"] > 0 and row["uncached_tok_s"] > 0
        assert row["TPF"] > 0 and row["prompt"] == 9 and row["gen"] == 16


def test_bench_rejects_a_zero_batch(checkpoint):
    proc = run_cli("bench", "--model", str(checkpoint), "--batch", "0", check=False)
    assert proc.returncode != 0 and "--batch: must be a positive integer, got 0" in proc.stderr

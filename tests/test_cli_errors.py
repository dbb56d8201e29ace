"""Every bad `llada-engine` invocation ends with one line on stderr naming the option or file and what is
expected, a non-zero exit and no traceback; the checks run before any weights are read. The runs are
in-process (llada_engine.cli.main) on the reference backend, and one is a real process, to see its exit
status and stderr as a shell does."""
import json
import subprocess
import sys

import pytest

from llada_engine.cli import main
from model_testing import TINY_CONFIG, tiny_checkpoint, tiny_state_dict, tiny_tokenizer, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cli-errors"), seed=61)[0]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A checkpoint whose config.json, like the release's, has no mask_token_id."""
    path = tmp_path_factory.mktemp("official")
    cfg = {k: v for k, v in TINY_CONFIG.items() if k != "mask_token_id"}
    write_checkpoint(path, cfg, tiny_state_dict(cfg, seed=62))
    tiny_tokenizer(path)
    return path


def run(capsys, *argv):
    try:
        status = main(list(argv))
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def one_line_error(capsys, *argv) -> str:
    status, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert status not in (0, None) and len(lines) == 1 and "Traceback" not in err, (status, err)
    return lines[0]


GENERATE_ERRORS = [
    (["--gen-length", "0"], "llada-engine generate: --gen-length must be a positive int, got 0"),
    (["--block-length", "-4"], "llada-engine generate: --block-length must be a positive int, got -4"),
    (["--steps", "0"], "llada-engine generate: --steps must be a positive int, got 0"),
    (["--threshold", "1.5"], "llada-engine generate: --threshold must be a number in [0, 1], got 1.5"),
    (["--threshold", "nan"], "llada-engine generate: --threshold must be a number in [0, 1], got nan"),
    (["--temperature", "-1"], "llada-engine generate: --temperature must be 0 (greedy) or a finite number >= 0.0001 "
                              "(smaller ones overflow logits / temperature), got -1.0"),
    (["--temperature", "1e-45"], "llada-engine generate: --temperature must be 0 (greedy) or a finite number >= "
                                 "0.0001 (smaller ones overflow logits / temperature), got 1e-45"),
    (["--top-p", "0"], "llada-engine generate: --top-p must be a number in (0, 1], got 0.0"),
    (["--top-k", "-1"], "llada-engine generate: --top-k must be an int >= 0 (0: no top-k), got -1"),
    (["--seed", str(2**64)], "llada-engine generate: --seed must be an int in [0, 2**64), got 18446744073709551616"),
    (["--mask-id", "1000"], "llada-engine generate: --mask-id must be a token id in [0, 96), got 1000"),
    (["--eos-id", "95"], "llada-engine generate: --eos-id and mask_id are both 95: EOS must be another token"),
    (["--gen-length", "5000"], "llada-engine generate: prompts[0]: 2 prompt tokens + gen_length 5000, in whole "
                               "blocks of block_length 32, run 5024 positions, more than the model's "
                               "max_position_embeddings 4096"),
    (["--gen-length", "x"], "llada-engine generate: argument --gen-length: invalid int value: 'x' (see llada-engine "
                            "generate --help)"),
    (["--device", "meta"], "llada-engine generate: argument --device: 'meta': llada_engine runs on cpu or cuda (see "
                          "llada-engine generate --help)"),
    (["--device", "nonsense"], "llada-engine generate: argument --device: 'nonsense' is not a device (e.g. cpu, "
                               "cuda, cuda:1) (see llada-engine generate --help)"),
    (["--dtype", "int8"], "llada-engine generate: argument --dtype: invalid choice: 'int8'"),
]


@pytest.mark.parametrize("args,message", GENERATE_ERRORS, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_generate_settings(capsys, checkpoint, args, message):
    line = one_line_error(capsys, "generate", "--model", str(checkpoint), "--backend", "reference", *args, "ab")
    assert line.startswith(message), line


def test_the_mask_id_of_an_official_config_is_asked_for(capsys, official):
    base = ["generate", "--model", str(official), "--backend", "reference", "--gen-length", "8", "--block-length", "4"]
    assert one_line_error(capsys, *base, "ab") == (
        "llada-engine generate: --mask-id: the checkpoint's config.json has no mask_token_id; pass --mask-id ... "
        "(LLaDA2.0 releases use 156895)")
    status, out, _ = run(capsys, *base, "--mask-id", "95", "ab")
    assert status == 0 and "TPF" in out


def test_missing_checkpoints_and_files(capsys, checkpoint, tmp_path):
    assert one_line_error(capsys, "generate", "--model", str(tmp_path / "none"), "hi") == \
        f"llada-engine generate: {tmp_path / 'none'}: no such checkpoint folder"
    (tmp_path / "no-config").mkdir()
    assert one_line_error(capsys, "generate", "--model", str(tmp_path / "no-config"), "hi") == \
        f"llada-engine generate: {tmp_path / 'no-config' / 'config.json'}: no config.json"
    assert one_line_error(capsys, "bench", "--model", str(tmp_path / "none")) == \
        f"llada-engine bench: {tmp_path / 'none'}: no such checkpoint folder"
    assert one_line_error(capsys, "generate", "--model", str(checkpoint / "config.json"), "hi") == \
        f"llada-engine generate: --model {checkpoint / 'config.json'}: not a checkpoint folder (config.json, " \
        f"safetensors, tokenizer.json)"
    assert one_line_error(capsys, "bench", "--model", str(checkpoint), "--backend", "reference", "--prompt-length",
                          "5000") == (
        "llada-engine bench: --prompt-length: 5000 prompt tokens + gen_length 128, in whole blocks of block_length "
        "32, run 5152 positions, more than the model's max_position_embeddings 4096")
    assert one_line_error(capsys, "generate", "--model", str(checkpoint), "--revision", "v2", "hi").startswith(
        f"llada-engine generate: revision: {checkpoint} is a local folder")
    assert one_line_error(capsys, "generate", "--model", str(checkpoint)) == \
        "llada-engine generate: give a prompt, or --prompts-file with one prompt per line"
    assert one_line_error(capsys, "merge", "--out", str(tmp_path / "m")) == \
        "llada-engine merge: give --run RUN_DIR, or checkpoint folders"
    assert one_line_error(capsys, "train", str(tmp_path / "run.yaml")).startswith(
        f"llada-engine train: {tmp_path / 'run.yaml'}")


@pytest.mark.parametrize("content,message", [
    (bytes(range(256)), "contains NUL bytes, not a text file (one prompt per line, UTF-8)"),
    ("café\nnaïve\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 3); give one prompt per line in UTF-8"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "not UTF-8 text (byte 0x89 at offset 0); give one prompt per line in UTF-8"),
    (None, "No such file or directory"),
    ("dir", "Is a directory"),
])
def test_unreadable_prompts_files_are_named(capsys, checkpoint, tmp_path, content, message):
    file = tmp_path / "prompts.txt"
    if content == "dir":
        file.mkdir()
    elif content is not None:
        file.write_bytes(content)
    line = one_line_error(capsys, "generate", "--model", str(checkpoint), "--backend", "reference",
                          "--prompts-file", str(file))
    assert line == f"llada-engine generate: --prompts-file {file}: {message}"


def test_a_broken_chat_template_file_is_named(capsys, checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    line = one_line_error(capsys, "generate", "--model", str(folder), "--backend", "reference", "--chat",
                          "--gen-length", "4", "--block-length", "4", "hi")
    assert line.startswith(f"llada-engine generate: {folder / 'tokenizer_config.json'}: not a readable "
                           f"tokenizer_config.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no chat') }}"}))
    line = one_line_error(capsys, "generate", "--model", str(folder), "--backend", "reference", "--chat",
                          "--gen-length", "4", "--block-length", "4", "hi")
    assert line == (f"llada-engine generate: {folder / 'tokenizer_config.json'}: its chat_template fails "
                    f"(TemplateError: no chat)")


def test_a_process_exits_non_zero_with_one_line(checkpoint, tmp_path):
    (tmp_path / "p.txt").write_bytes("é".encode("latin-1"))
    proc = subprocess.run([sys.executable, "-m", "llada_engine.cli", "generate", "--model", str(checkpoint),
                           "--prompts-file", str(tmp_path / "p.txt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"llada-engine generate: --prompts-file {tmp_path / 'p.txt'}: not UTF-8 text (byte 0xe9 "
                           f"at offset 0); give one prompt per line in UTF-8\n")


def test_the_training_entry_point_reports_one_line_too(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("run:\n  out_dir: x\n")
    for argv, status, message in (
            ([str(config)], 1, f"python -m llada_engine.train: {config}: model: give exactly one of model.init"),
            ([], 2, "python -m llada_engine.train: the following arguments are required: config (see python -m "
                    "llada_engine.train --help)")):
        proc = subprocess.run([sys.executable, "-m", "llada_engine.train", *argv], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == status and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(message), proc.stderr

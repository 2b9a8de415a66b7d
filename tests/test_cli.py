"""The `charrnn` command as a user runs it: plain errors (exit 2, no traceback), streaming sample, info."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.train import train

from conftest import REPO, tiny_config


def charrnn(*args: str, cwd: Path = REPO, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "abc.txt"
    data.write_text("abcabcabd\n" * 300)
    # the start left as trained (zero), so `evaluate` reproduces the recorded loss; choose-start is tested below
    result = train(tiny_config(tmp, data, name="abc", max_steps=40, eval_every=20, lr=1e-2, choose_start=False))
    return result.checkpoint


def assert_plain_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr


def test_train_errors_are_plain_sentences(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("olé".encode("latin-1"))
    (tmp_path / "short.txt").write_text("tiny text " * 30)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "empty.txt").write_text("")
    cases = {
        "missing.txt": "no such file",
        "latin1.txt": "not valid UTF-8",
        "short.txt": "too short for one batch",
        "blob.bin": "binary",
        "empty.txt": "empty",
    }
    for name, fragment in cases.items():
        proc = charrnn("train", "--data", str(tmp_path / name), "--name", "x", "--run-dir", str(tmp_path / "r"),
                       "--model-store", str(tmp_path / "s"))
        assert_plain_error(proc, "error:", fragment)


def test_train_refuses_a_path_as_model_name(tmp_path):
    proc = charrnn("train", "--data", str(REPO / "data" / "tinyshakespeare.txt"), "--name", "../evil",
                   "--run-dir", str(tmp_path / "r"))
    assert_plain_error(proc, "invalid model name")


def test_sample_streams_the_prime_and_continuation(trained):
    proc = charrnn("sample", str(trained), "--prime", "abc", "--temperature", "0", "--length", "20")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("abc") and len(proc.stdout.rstrip("\n")) >= 20


def test_sample_by_name_from_the_model_store_env(trained):
    proc = charrnn("sample", "abc", "--length", "30", "--seed", "1",
                   env_extra={"CHARRNN_MODEL_STORE": str(trained.parent)})
    again = charrnn("sample", "abc", "--length", "30", "--seed", "1", "--model-store", str(trained.parent))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == again.stdout and len(proc.stdout) == 31


def test_sample_names_unknown_prime_characters_or_skips_them(trained):
    proc = charrnn("sample", str(trained), "--prime", "abXYa", "--length", "5")
    assert_plain_error(proc, "'X' (U+0058)", "'Y' (U+0059)", "--skip-unknown")
    ok = charrnn("sample", str(trained), "--prime", "abXYa", "--length", "5", "--skip-unknown")
    assert ok.returncode == 0, ok.stderr


def test_sample_unknown_model_is_a_plain_error(trained):
    assert_plain_error(charrnn("sample", "nosuchmodel", "--model-store", str(trained.parent)), "no such checkpoint")
    assert_plain_error(charrnn("sample", "bad name!"), "invalid model name")
    # a path is allowed on the command line, but a file that is not a checkpoint is refused plainly
    assert_plain_error(charrnn("sample", str(REPO / "pyproject.toml")), "not a safetensors file")


def test_info_prints_the_header(trained):
    proc = charrnn("info", str(trained))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["config"]["cell"] == "lstm" and info["vocab"] == "\nabcd"
    assert info["training"]["data_file"] == "abc.txt"


def test_console_script_sets_the_allocator_variables():
    script = Path(sys.executable).parent / "charrnn"
    code = "import os; print(os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ.get('MALLOC_TRIM_THRESHOLD_'))"
    # `charrnn` re-executes itself as `python -m cli`; check the variables reach that process.
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "train" in proc.stdout
    from charrnn.runtime import ALLOCATOR_ENV
    import os

    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, **ALLOCATOR_ENV})
    assert probe.stdout.split() == ["4294967296", "4294967296"]


def test_evaluate_measures_the_stored_checkpoint(trained, tmp_path):
    from charrnn.checkpoint import read_metadata

    data = trained.parent.parent / "abc.txt"
    proc = charrnn("evaluate", str(trained), "--data", str(data), "--batch-size", "8", "--seq-len", "16")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    # the same split and batching as training, so the recorded best loss is reproduced
    assert result["val_loss"] == pytest.approx(read_metadata(trained).training["best_val_loss"], abs=1e-4)
    other = tmp_path / "other.txt"
    other.write_text("xyz" * 100)
    assert_plain_error(charrnn("evaluate", str(trained), "--data", str(other)), "'x' (U+0078)")


def test_choose_start_stores_the_best_and_evaluate_and_info_report_it(trained, tmp_path):
    from charrnn.checkpoint import read_metadata

    data = trained.parent.parent / "abc.txt"
    path = tmp_path / "abc.safetensors"
    path.write_bytes(trained.read_bytes())
    before = json.loads(charrnn("evaluate", str(path), "--data", str(data), "--protocol", "start").stdout)
    assert before["start"] == "zero" and before["val_loss"] == before["zero_start_loss"]
    proc = charrnn("choose-start", str(path), "--data", str(data))
    assert proc.returncode == 0, proc.stderr
    start = json.loads(proc.stdout)
    assert "start tuned" in proc.stderr and start == read_metadata(path).start
    assert start["loss"] == min(start["candidates"].values()) and start["loss"] < start["candidates"]["zero"]
    after = json.loads(charrnn("evaluate", str(path), "--data", str(data), "--protocol", "start").stdout)
    assert after["start"] == start["kind"] and after["val_loss"] == pytest.approx(start["loss"], abs=1e-5)
    assert after["zero_start_loss"] == pytest.approx(start["candidates"]["zero"], abs=1e-5)
    assert after["scored_chars"] == after["passages"] * 32
    assert json.loads(charrnn("info", str(path)).stdout)["start"] == start
    assert_plain_error(charrnn("choose-start", str(path), "--data", str(tmp_path / "none.txt")), "no such file")

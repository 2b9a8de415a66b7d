"""End-to-end training on small texts: it learns, resumes exactly, handles Unicode, keeps the best checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file, save

from charrnn.checkpoint import load_model, read_header, read_metadata
from charrnn.engine import Engine
from training.data import DataError
from training.resume import RESUME_FILE, load_resume
from training.train import config_from_resume, train

from conftest import tiny_config


def test_tiny_model_overfits_a_repeated_string_and_greedy_sampling_reproduces_it(tmp_path):
    phrase = "the quick brown fox jumps over the lazy dog. "
    data = tmp_path / "fox.txt"
    data.write_text(phrase * 60)
    cfg = tiny_config(tmp_path, data, layers=1, hidden=64, dropout=0.0, lr=1e-2, seq_len=32, batch_size=4,
                      max_steps=300, eval_every=50, decay_after=1e9)
    result = train(cfg)
    assert result.best_val < 0.05  # nats/char: essentially memorised
    model, vocab, info = load_model(result.checkpoint)
    text = "".join(Engine(model).generate(vocab, prime="the quick", length=len(phrase) * 2, temperature=0))
    assert text == (phrase * 3)[len("the quick") : len("the quick") + len(phrase) * 2]
    assert info.training["best_val_loss"] == pytest.approx(result.best_val)


def test_run_writes_log_loss_curve_and_checkpoint_facts(tmp_path, shakespeare_slice):
    # the start left as trained (zero): samples are drawn from the start the model has at that moment
    cfg = tiny_config(tmp_path, shakespeare_slice, max_steps=10, eval_every=5, sample_every=10, sample_length=30,
                      choose_start=False)
    result = train(cfg)
    run = tmp_path / "runs" / "tiny"
    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if e["type"] == "val"] == [5, 10]
    assert all(e["val_bpc"] == pytest.approx(e["val_loss"] / 0.6931471805599453) for e in entries if e["type"] == "val")
    samples = [e["text"] for e in entries if e["type"] == "sample"]
    assert [len(text) for text in samples] == [30]
    # drawn by the inference engine with dropout off: exactly what the step-10 checkpoint gives when served
    assert result.best_step == 10
    model, vocab, _ = load_model(result.checkpoint)
    assert samples[0] == "".join(Engine(model).generate(vocab, "", 30, temperature=1.0, seed=cfg.seed))
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    facts = read_metadata(result.checkpoint).training
    assert facts["data_file"] == "slice.txt" and len(facts["data_sha256"]) == 64
    assert facts["best_val_loss"] == min(e["val_loss"] for e in entries if e["type"] == "val")
    assert facts["train_config"]["hidden"] == 32 and facts["created"]


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, shakespeare_slice):
    # dropout > 0 so the RNG state matters; 12 steps cross an epoch boundary is not needed for exactness,
    # but the carried hidden state and the optimizer moments are.
    straight = tiny_config(tmp_path / "a", shakespeare_slice, max_steps=12, eval_every=3, dropout=0.3)
    train(straight)

    first_half = tiny_config(tmp_path / "b", shakespeare_slice, max_steps=6, eval_every=3, dropout=0.3)
    train(first_half)
    run_b = tmp_path / "b" / "runs" / "tiny"
    resumed = train(config_from_resume(run_b, max_steps=12), resume_from=run_b)
    assert resumed.steps == 12

    a = load_file(str(tmp_path / "a" / "runs" / "tiny" / RESUME_FILE))
    b = load_file(str(run_b / RESUME_FILE))
    weights = [k for k in a if k.startswith("model.")]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)
    assert torch.equal(a["hidden.0"], b["hidden.0"])
    best_a = load_file(str(tmp_path / "a" / "store" / "tiny.safetensors"))
    best_b = load_file(str(tmp_path / "b" / "store" / "tiny.safetensors"))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_a_resume_file_from_before_workers_still_resumes_exactly(tmp_path, shakespeare_slice):
    # format 1: one process's generator state as "rng.cpu", no world size
    train(tiny_config(tmp_path / "a", shakespeare_slice, max_steps=8, eval_every=4, dropout=0.3))
    train(tiny_config(tmp_path / "b", shakespeare_slice, max_steps=4, eval_every=4, dropout=0.3))
    run_b = tmp_path / "b" / "runs" / "tiny"
    path = run_b / RESUME_FILE
    metadata = read_header(path)["__metadata__"]
    del metadata["world_size"]
    tensors = load_file(str(path))
    tensors["rng.cpu"] = tensors.pop("rng.cpu.0")
    path.write_bytes(save(tensors, metadata={**metadata, "format_version": "charrnn-resume-1"}))

    assert load_resume(run_b).world_size == 1
    train(config_from_resume(run_b, max_steps=8), resume_from=run_b)
    a = load_file(str(tmp_path / "a" / "runs" / "tiny" / RESUME_FILE))
    b = load_file(str(path))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_run_with_the_same_name_does_not_silently_overwrite(tmp_path, shakespeare_slice):
    cfg = tiny_config(tmp_path, shakespeare_slice, max_steps=2, eval_every=2)
    train(cfg)
    with pytest.raises(DataError, match="--resume"):
        train(cfg)
    train(cfg, overwrite=True)


def test_resume_refuses_a_different_text(tmp_path, shakespeare_slice):
    cfg = tiny_config(tmp_path, shakespeare_slice, max_steps=2, eval_every=2)
    train(cfg)
    other = tmp_path / "other.txt"
    other.write_text("completely different text, with different characters! 0123456789 " * 50)
    run = tmp_path / "runs" / "tiny"
    with pytest.raises(DataError, match="vocabulary differs"):
        train(config_from_resume(run, data=str(other), max_steps=4), resume_from=run)


def test_unicode_text_trains_and_round_trips(tmp_path):
    data = tmp_path / "unicode.txt"
    data.write_text("Ça va très bien. 東京は大きい。 Ωμέγα — naïve café.\n" * 40, encoding="utf-8")
    result = train(tiny_config(tmp_path, data, name="uni", max_steps=30, eval_every=10, lr=1e-2, dropout=0.0))
    model, vocab, _ = load_model(result.checkpoint)
    assert {"東", "Ω", "é", "—"} <= set(vocab.chars)
    out = "".join(Engine(model).generate(vocab, prime="東京", length=50, temperature=1.0, seed=0))
    assert len(out) == 50 and set(out) <= set(vocab.chars)


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_other_cells_train_and_lose_loss(tmp_path, shakespeare_slice, cell):
    result = train(tiny_config(tmp_path, shakespeare_slice, cell=cell, max_steps=20, eval_every=20, lr=1e-2))
    model, _, _ = load_model(result.checkpoint)
    assert model.config.cell == cell
    assert result.best_val < 3.5  # well below uniform over the vocabulary (ln 60 ~ 4.1)


def test_rmsprop_and_bf16_autocast_train(tmp_path, shakespeare_slice):
    result = train(tiny_config(tmp_path, shakespeare_slice, optim="rmsprop", precision="bf16", max_steps=20,
                               eval_every=20, lr=3e-3))
    assert result.best_val < 3.6


def test_max_minutes_stops_cleanly_with_a_checkpoint(tmp_path, shakespeare_slice):
    result = train(tiny_config(tmp_path, shakespeare_slice, max_steps=None, max_minutes=0.05, eval_every=10_000))
    assert result.stopped_because == "max_minutes"
    assert 0 < result.steps and result.checkpoint.exists()


def test_seeded_sampling_is_repeatable(tmp_path, shakespeare_slice):
    result = train(tiny_config(tmp_path, shakespeare_slice, max_steps=5, eval_every=5))
    model, vocab, _ = load_model(result.checkpoint)
    engine = Engine(model)
    a = "".join(engine.generate(vocab, "ROMEO:", 80, temperature=1.0, seed=42))
    b = "".join(engine.generate(vocab, "ROMEO:", 80, temperature=1.0, seed=42))
    c = "".join(engine.generate(vocab, "ROMEO:", 80, temperature=1.0, seed=43))
    assert a == b and a != c


@pytest.mark.parametrize("which", ["run_dir", "model_store"])
def test_an_unwritable_run_folder_or_store_fails_before_training(tmp_path, shakespeare_slice, which):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = tiny_config(tmp_path, shakespeare_slice, max_steps=1000, **{which: str(blocker / "sub")})
    with pytest.raises(DataError, match="cannot write the (run folder|model store)") as failure:
        train(cfg)
    assert "\n" not in str(failure.value)  # one line
    assert not (tmp_path / "runs" / "tiny" / "log.jsonl").exists()  # not a step was trained


def test_a_killed_run_resumes_with_each_step_logged_once_and_no_litter(tmp_path, shakespeare_slice):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    store, run = tmp_path / "store", tmp_path / "runs" / "tiny"
    store.mkdir(parents=True)
    # what killed writes leave behind (atomic_write's temporary names), and files that are not ours
    litter = [store / ".tiny.safetensors.ab12cd_9.tmp", run / ".resume.safetensors.zz99yy00.tmp"]
    foreign = [store / ".other.safetensors.ab12cd_9.tmp", store / ".tiny.safetensors.x.safetensors.ab12cd_9.tmp",
               run / "notes.tmp"]
    run.mkdir(parents=True)
    for path in litter + foreign:
        path.write_bytes(b"half a file")
    command = [sys.executable, "-m", "cli", "train", "--data", str(shakespeare_slice), "--name", "tiny",
               "--model-store", str(store), "--run-dir", str(run), "--layers", "1", "--hidden", "16",
               "--seq-len", "16", "--batch-size", "4", "--eval-every", "50", "--max-steps", "100000", "--threads", "1",
               "--precision", "fp32", "--no-choose-start"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run / "log.jsonl"

    def rows() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # a save (val row) and train rows past it: a resume will redo those
        entries = rows()
        vals = [e["step"] for e in entries if e["type"] == "val"]
        if vals and max(e["step"] for e in entries) >= vals[-1] + 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not any(path.exists() for path in litter) and all(path.exists() for path in foreign)
    saved = load_resume(run).step
    assert max(e["step"] for e in rows()) > saved  # the log went on past the last save
    resumed = subprocess.run([sys.executable, "-m", "cli", "train", "--resume", str(run), "--max-steps",
                              str(saved + 60)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    entries = rows()
    for kind in ("train", "val"):
        steps = [e["step"] for e in entries if e["type"] == kind]
        assert steps == sorted(set(steps)), f"{kind} rows: {steps}"  # each step once, in order
    assert max(e["step"] for e in entries) == saved + 60
    assert set(store.glob(".tiny.safetensors.*.tmp")) == {foreign[1]} and not list(run.glob(".resume.*.tmp"))


def test_a_new_run_starts_a_new_log(tmp_path, shakespeare_slice):
    train(tiny_config(tmp_path, shakespeare_slice, max_steps=10, eval_every=5, choose_start=False))
    train(tiny_config(tmp_path, shakespeare_slice, max_steps=10, eval_every=5, choose_start=False), overwrite=True)
    entries = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if e["type"] == "val"] == [5, 10]

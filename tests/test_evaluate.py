"""Held-out loss three ways (training/evaluate.py): each protocol against a hand computation or the trainer."""

import dataclasses
import hashlib
import json
import random

import pytest
import torch
import torch.nn.functional as F

from charrnn.checkpoint import load_model, read_metadata
from charrnn.model import CharRNN
from training.data import load_text, split
from training.evaluate import dynamic_evaluation, dynamic_loss, stream_loss, window_starts, windows_loss

from test_cli import assert_plain_error, charrnn


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LSTM (2x32, dropout 0.1, saved in fp32) whose start is left as trained (zero), so its measures are
    the trainer's, and the held-out ids of its text."""
    from training.train import train

    from conftest import SHAKESPEARE, tiny_config

    root = tmp_path_factory.mktemp("evaluate")
    data = root / "slice.txt"
    data.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    path = train(tiny_config(root, data, max_steps=40, eval_every=40, lr=1e-2, choose_start=False)).checkpoint
    model, vocab, info = load_model(path)
    text = load_text(data).text
    _, val = split(torch.from_numpy(vocab.encode(text)), info.training["train_config"]["val_frac"])
    return path, model, vocab, val


def test_stream_loss_is_the_trainers_recorded_validation_loss(tiny):
    path, model, _, val = tiny
    cfg = read_metadata(path).training["train_config"]
    loss = stream_loss(model, val, cfg["batch_size"], cfg["seq_len"])
    assert loss.nats == pytest.approx(read_metadata(path).training["best_val_loss"], abs=1e-6)
    assert loss.chars == 8 * (1999 // 8 // 16) * 16  # 8 streams of whole 16-character chunks


def test_windows_loss_equals_stepping_each_window_one_character_at_a_time(tiny):
    _, model, _, val = tiny
    window, batches, batch_size, seed = 20, 2, 3, 5
    result = windows_loss(model, val, window, batches, batch_size, seed)

    by_position = torch.zeros(window, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)  # nanoGPT's draws, by hand
    for _ in range(batches):
        for i in torch.randint(len(val) - window, (batch_size,), generator=generator).tolist():
            state = model.init_state(1)
            for t in range(window):
                with torch.no_grad():
                    logits, state = model(val[None, i + t : i + t + 1].long(), state)
                by_position[t] -= F.log_softmax(logits[0, -1].double(), -1)[int(val[i + t + 1])]
    by_position /= batches * batch_size
    assert result.nats == pytest.approx(by_position.mean().item(), abs=1e-5)
    assert result.by_position == pytest.approx(by_position.tolist(), abs=1e-5)
    assert (result.windows, result.chars) == (6, 6 * window)
    assert not model.training


def test_window_starts_are_fixed_by_the_seed_and_stay_inside_the_text():
    first = window_starts(300, 256, 4, 64, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, window_starts(300, 256, 4, 64, seed=1)))
    assert not torch.equal(first[0], window_starts(300, 256, 4, 64, seed=2)[0])
    assert max(s.max().item() for s in first) + 256 < 300
    with pytest.raises(Exception, match="too short for a window of 256"):
        window_starts(256, 256, 1, 1, seed=1)


def test_dynamic_loss_at_lr_0_is_the_static_loss_of_one_stream(tiny):
    _, model, _, val = tiny
    ids = val[: 16 * 40 + 1]  # whole 16-character segments, so the stream protocol scores the same characters
    static = dynamic_loss(model, ids, lr=0.0, segment=16)
    assert static.chars == 640
    assert static.nats == pytest.approx(stream_loss(model, ids, batch_size=1, seq_len=16).nats, abs=1e-6)


@pytest.mark.parametrize("regularisers", [{"weight_drop": 0.5}, {"embed_drop": 0.5},
                                          {"dropout": 0.5, "locked_dropout": True}])
def test_dynamic_evaluation_of_a_regularised_model_drops_nothing(tiny, regularisers):
    # weight drop, embedding and locked dropout act in training mode, which the learner copy is in
    _, model, _, val = tiny
    config = dataclasses.replace(model.config, **regularisers)
    regularised = CharRNN(config)
    regularised.load_state_dict(model.state_dict())
    regularised.eval()
    ids = val[: 16 * 40 + 1]
    static = stream_loss(regularised, ids, batch_size=1, seq_len=16).nats
    assert static == pytest.approx(stream_loss(model, ids, batch_size=1, seq_len=16).nats, abs=1e-6)
    assert dynamic_loss(regularised, ids, lr=0.0, segment=16).nats == pytest.approx(static, abs=1e-6)
    assert dynamic_loss(regularised, ids, lr=0.1, segment=16).nats == pytest.approx(
        dynamic_loss(model, ids, lr=0.1, segment=16).nats, abs=1e-5)


def test_dynamic_evaluation_learns_repeated_text_and_changes_no_weights(tiny):
    _, model, vocab, _ = tiny
    rng = random.Random(0)
    phrase = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(50))
    ids = torch.from_numpy(vocab.encode(phrase * 24))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    result = dynamic_evaluation(model, ids, segment=16, grid=(0.01, 0.1, 0.3))
    assert result.lr == 0.3 and list(result.tuning) == [0.01, 0.1, 0.3] and result.tuned_chars == 600
    assert result.static.chars == result.dynamic.chars == 599  # the same second half, scored both ways
    assert result.dynamic.nats < result.static.nats - 0.5
    assert result.static.nats == pytest.approx(dynamic_loss(model, ids[600:], 0.0, 16).nats, abs=1e-9)
    # the model given is a copy's source only: same weights, still in eval mode, no gradients kept
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and all(p.grad is None for p in model.parameters())
    # a given learning rate skips the tuning half but reports the same half
    given = dynamic_evaluation(model, ids, lr=0.3, segment=16)
    assert given.tuning == {} and given.dynamic.nats == pytest.approx(result.dynamic.nats, abs=1e-6)


def test_cli_windows_and_dynamic_read_the_checkpoint_and_never_write_it(tiny):
    path, model, _, val = tiny
    data = path.parent.parent / "slice.txt"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    mtime = path.stat().st_mtime_ns
    proc = charrnn("evaluate", str(path), "--data", str(data), "--protocol", "windows", "--windows", "12",
                   "--batch-size", "4", "--window", "32", "--seed", "3", "--dynamic", "--dynamic-chars", "601",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    expected = windows_loss(model, val, 32, 3, 4, seed=3)
    assert result["protocol"] == "windows" and (result["windows"], result["scored_chars"]) == (12, 12 * 32)
    assert result["val_loss"] == pytest.approx(expected.nats, abs=2e-5)
    assert result["val_bpc"] == pytest.approx(expected.bits, abs=2e-5)
    assert result["loss_at_position"]["0"] == pytest.approx(expected.by_position[0], abs=1e-4)
    dyn = result["dynamic"]
    assert (dyn["held_out_chars"], dyn["tuned_on_chars"], dyn["reported_on_chars"]) == (601, 300, 301)
    assert float(min(dyn["lr_grid"], key=lambda k: dyn["lr_grid"][k] or float("inf"))) == dyn["lr"]
    assert dyn["static_loss"] == pytest.approx(dynamic_loss(model, val[300:601], 0.0).nats, abs=2e-5)
    assert dyn["dynamic_loss"] == pytest.approx(dynamic_loss(model, val[300:601], dyn["lr"]).nats, abs=2e-4)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest and path.stat().st_mtime_ns == mtime

    stream = json.loads(charrnn("evaluate", str(path), "--data", str(data)).stdout)  # the model's own 8 x 16
    assert stream["protocol"] == "stream" and "dynamic" not in stream
    assert stream["val_loss"] == pytest.approx(stream["recorded_val_loss"], abs=1e-5)


def test_cli_evaluate_refuses_what_it_cannot_measure(tiny):
    path, *_ = tiny
    data = str(path.parent.parent / "slice.txt")
    assert_plain_error(charrnn("evaluate", str(path), "--data", data, "--protocol", "nanogpt"),
                       "stream, windows or start")
    assert_plain_error(charrnn("evaluate", str(path), "--data", data, "--protocol", "windows", "--windows", "10",
                               "--batch-size", "4"), "multiple of --batch-size")
    assert_plain_error(charrnn("evaluate", str(path), "--data", data, "--protocol", "windows", "--window", "5000"),
                       "too short for a window of 5000")
    assert_plain_error(charrnn("evaluate", str(path), "--data", data, "--dynamic-lr", "0.1"), "go with --dynamic")


def test_cli_measures_by_default_as_the_model_was_trained(tmp_path, shakespeare_slice):
    from training.train import train

    from conftest import tiny_config

    result = train(tiny_config(tmp_path, shakespeare_slice, val_frac=0.25, batch_size=4, seq_len=8, max_steps=5,
                               choose_start=False))  # the start as trained, so the recorded loss is reproduced
    out = json.loads(charrnn("evaluate", str(result.checkpoint), "--data", str(shakespeare_slice)).stdout)
    assert (out["val_frac"], out["val_chars"], out["streams"], out["seq_len"]) == (0.25, 5000, 4, 8)
    assert out["val_loss"] == pytest.approx(result.best_val, abs=1e-5)


def test_the_stream_protocol_reads_each_stream_from_the_models_start(tiny, tmp_path):
    from training.start import choose_for_checkpoint

    path, model, vocab, val = tiny
    chosen = tmp_path / "chosen.safetensors"
    chosen.write_bytes(path.read_bytes())
    text = load_text(path.parent.parent / "slice.txt").text
    choose_for_checkpoint(chosen, *split(torch.from_numpy(vocab.encode(text)), 0.1))
    started, _, _ = load_model(chosen)
    cfg = read_metadata(path).training["train_config"]
    from training.data import val_batches

    batches = val_batches(val, cfg["batch_size"], cfg["seq_len"])  # by hand: every stream from the start
    state, total, count = started.start_state(batches.batch_size), 0.0, 0
    for step in range(len(batches)):
        x, y = batches.get(step)
        with torch.no_grad():
            logits, state = started(x, state)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    loss = stream_loss(started, val, cfg["batch_size"], cfg["seq_len"]).nats
    assert loss == pytest.approx(total / count, abs=1e-6)
    assert loss != pytest.approx(stream_loss(model, val, cfg["batch_size"], cfg["seq_len"]).nats, abs=1e-4)
    out = json.loads(charrnn("evaluate", str(chosen), "--data", str(path.parent.parent / "slice.txt")).stdout)
    assert out["start"] == read_metadata(chosen).start["kind"] and out["val_loss"] == pytest.approx(loss, abs=1e-5)

"""Defaults that fit the machine: the size rule, the speed probe, precision auto, evaluations by the clock."""

import json

import pytest

import training.train as trainer
from charrnn.checkpoint import read_metadata
from charrnn.vocab import Vocab
from training.data import Batches, encode_corpus
from training.train import Probe, choose_size, settle_defaults, train

from conftest import tiny_config
from test_cli import charrnn

# chars/s of the probe's sizes in fp32 on our 2-vCPU Xeon with AVX-512 bf16 (docs/models.md)
MEASURED = [Probe(2, 128, 248_601, 96_000), Probe(2, 256, 884_633, 36_000), Probe(2, 384, 1_913_881, 17_700),
            Probe(2, 512, 3_336_345, 11_400)]


def test_the_rule_takes_the_largest_size_that_sees_enough_characters_per_parameter():
    assert choose_size(MEASURED, 85).size == "2x128"  # --max-minutes 1.5, less the probe
    assert choose_size(MEASURED, 3 * 60).size == "2x256"
    assert choose_size(MEASURED, 20 * 60).size == "2x384"
    assert choose_size(MEASURED, 60 * 60 - 10).size == "2x512"  # a long budget still gets the big model
    assert choose_size(MEASURED, 1).size == "2x128"  # none sees enough: the smallest
    # a probe that stopped early (at the first size that did not fit) chooses the same
    assert choose_size(MEASURED[:2], 85).size == "2x128"


def batches_of(path) -> tuple[int, Batches]:
    text = path.read_text(encoding="utf-8")
    vocab = Vocab.from_text(text)
    return len(vocab), Batches(encode_corpus(text, vocab), 8, 16)


def test_size_flags_or_no_budget_are_not_probed(tmp_path, shakespeare_slice, capsys):
    vocab_size, batches = batches_of(shakespeare_slice)
    given = tiny_config(tmp_path, shakespeare_slice, layers=None, hidden=48, embed=None, max_minutes=1.0,
                        precision="fp32")
    cfg = settle_defaults(given, vocab_size, batches, trainer.resolve_device("cpu"), deadline=float("inf"))
    assert (cfg.layers, cfg.hidden, cfg.embed) == (2, 48, 64)
    unbudgeted = tiny_config(tmp_path, shakespeare_slice, layers=None, hidden=None, embed=None, max_minutes=None,
                             precision="bf16")
    cfg = settle_defaults(unbudgeted, vocab_size, batches, trainer.resolve_device("cpu"), deadline=float("inf"))
    assert (cfg.layers, cfg.hidden, cfg.embed, cfg.precision) == (*trainer.DEFAULT_SIZE, "bf16")
    assert capsys.readouterr().out == ""  # nothing probed, nothing said


def test_auto_precision_becomes_fp32_or_bf16_and_is_recorded(tmp_path, shakespeare_slice):
    result = train(tiny_config(tmp_path, shakespeare_slice, precision="auto", max_steps=2, eval_every=2))
    assert read_metadata(result.checkpoint).training["train_config"]["precision"] in ("fp32", "bf16")


def test_evaluations_also_come_by_the_clock(tmp_path, shakespeare_slice, monkeypatch):
    monkeypatch.setattr(trainer, "FIRST_EVAL_S", 0.0)
    monkeypatch.setattr(trainer, "EVAL_INTERVAL_S", 0.0)
    train(tiny_config(tmp_path, shakespeare_slice, max_steps=3, eval_every=10_000))
    log = tmp_path / "runs" / "tiny" / "log.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["step"] for e in entries if e["type"] == "val"] == [1, 2, 3]


def test_a_budget_without_size_flags_probes_and_says_what_it_chose(tmp_path, shakespeare_slice):
    proc = charrnn("train", "--data", str(shakespeare_slice), "--max-minutes", "0.1", "--threads", "1",
                   "--run-dir", str(tmp_path / "run"), "--model-store", str(tmp_path / "store"))
    assert proc.returncode == 0, proc.stderr
    assert "speed probe" in proc.stdout and "2x128 " in proc.stdout
    assert "size 2x128: the largest that sees 5 characters per parameter" in proc.stdout  # 6 s is too short for more
    assert "model: lstm 2x128" in proc.stdout
    assert (tmp_path / "store" / "slice.safetensors").exists()  # named after the data file


def test_the_cli_resumes_a_run(tmp_path, shakespeare_slice):
    common = ["--run-dir", str(tmp_path / "run"), "--model-store", str(tmp_path / "store")]
    first = charrnn("train", "--data", str(shakespeare_slice), "--layers", "1", "--hidden", "16", "--batch-size", "8",
                    "--seq-len", "16", "--max-steps", "2", "--threads", "1", *common)
    assert first.returncode == 0, first.stderr
    again = charrnn("train", "--resume", str(tmp_path / "run"), "--max-steps", "4", "--model-store",
                    str(tmp_path / "store"))
    assert again.returncode == 0, again.stderr
    assert "lstm 1x16" in again.stdout and "resuming at step 2" in again.stdout and "at step 4" in again.stdout


@pytest.mark.parametrize("flag", [["--precision", "int8"]])
def test_a_bad_precision_is_a_plain_error(tmp_path, shakespeare_slice, flag):
    proc = charrnn("train", "--data", str(shakespeare_slice), *flag, "--run-dir", str(tmp_path / "r"))
    assert proc.returncode == 2 and "--precision must be auto, fp32 or bf16" in proc.stderr

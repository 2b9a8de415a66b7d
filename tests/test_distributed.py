"""Training with several workers under torchrun (gloo, 2 processes on 127.0.0.1): one model, exact resume, no hangs.

Each test starts real worker processes, as a user does (README, "Train on several processes or machines"),
with a tiny model on a slice of tiny-shakespeare.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.data import DataError
from training.distributed import World
from training.resume import RESUME_FILE, load_resume
from training.train import config_from_resume, train

from conftest import REPO, tiny_config

DROPOUT_RUN = ["--dropout", "0.3", "--eval-every", "1000"]  # random numbers matter; saves only when it stops
ONE_MACHINE = ["--standalone", "--nproc-per-node", "2"]  # torchrun picks a free port on 127.0.0.1
TINY = ["--layers", "2", "--hidden", "32", "--embed", "16", "--seq-len", "16", "--batch-size", "8", "--seed", "7",
        "--threads", "1", "--precision", "fp32"]  # tiny_config's model, as flags


def torchrun_command(data: Path, where: Path, *flags: str, launch: list[str] = ONE_MACHINE) -> list[str]:
    """`torchrun <launch> -m charrnn train ...` with the tiny model, writing under `where`."""
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "charrnn", "train", "--data", str(data),
            "--name", "tiny", "--model-store", str(where / "store"), "--run-dir", str(where / "runs" / "tiny"),
            *TINY, *flags]


def torchrun(data: Path, where: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(data, where, *flags), capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def resume_torchrun(where: Path, *flags: str) -> subprocess.CompletedProcess:
    run = where / "runs" / "tiny"
    command = [sys.executable, "-m", "torch.distributed.run", *ONE_MACHINE, "-m", "charrnn", "train",
               "--resume", str(run), "--model-store", str(where / "store"), *flags]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)


def log_rows(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def workers_of(parent: int) -> dict[int, int]:
    """{rank: pid} of the processes `parent` started, read from their environment (torchrun's RANK)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                env = (stat.parent / "environ").read_bytes().split(b"\0")
                rank = next(int(v.split(b"=")[1]) for v in env if v.startswith(b"RANK="))
                found[rank] = int(stat.parent.name)
        except (OSError, IndexError, StopIteration, ValueError):
            continue  # gone meanwhile, or not a worker
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.2)


def test_two_workers_train_the_model_one_process_trains(tmp_path, shakespeare_slice):
    # dropout 0: with dropout the workers' masks differ from the one process's, by design
    two = torchrun(shakespeare_slice, tmp_path / "two", "--dropout", "0", "--max-steps", "10", "--eval-every", "5")
    assert two.returncode == 0, two.stderr
    one = train(tiny_config(tmp_path / "one", shakespeare_slice, dropout=0.0, max_steps=10, eval_every=5))
    assert one.steps == 10

    assert two.stdout.count("model: lstm 2x32") == 1 and "2 workers of 4 streams each" in two.stdout  # rank 0 speaks
    rows_two, rows_one = log_rows(tmp_path / "two" / "runs" / "tiny"), log_rows(tmp_path / "one" / "runs" / "tiny")
    assert [(r["type"], r["step"]) for r in rows_two] == [(r["type"], r["step"]) for r in rows_one]  # once each
    for a, b in zip(rows_two, rows_one):
        assert a.get("loss", a.get("val_loss")) == pytest.approx(b.get("loss", b.get("val_loss")), rel=1e-5)
    a = load_file(str(tmp_path / "two" / "runs" / "tiny" / RESUME_FILE))
    b = load_file(str(tmp_path / "one" / "runs" / "tiny" / RESUME_FILE))
    weights = [k for k in b if k.startswith(("model.", "optim.", "hidden."))]
    assert weights and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in weights)
    assert a["hidden.0"].shape == b["hidden.0"].shape == (2, 8, 32)  # all 8 streams, gathered from both workers
    assert not torch.equal(a["rng.cpu.0"], a["rng.cpu.1"])  # each worker its own dropout generator


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[Path, Path, int, str]:
    """(data, folder, step, stdout) of a two-worker run with dropout (so the generators matter) stopped by Ctrl-C."""
    where = tmp_path_factory.mktemp("stopped")
    data = where / "slice.txt"
    data.write_text((REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    run = where / "runs" / "tiny"
    proc = subprocess.Popen(torchrun_command(data, where, *DROPOUT_RUN, "--max-steps", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for(lambda: (run / "log.jsonl").exists(), 60, "the first steps")  # a train row every 10 steps
        workers = workers_of(proc.pid)
        assert sorted(workers) == [0, 1]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does: torchrun passes it on to the workers
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert not any(alive(pid) for pid in workers.values())
    stopped = re.search(r"stopped \(interrupted\) at step (\d+)", out)
    assert stopped, err
    return data, where, int(stopped[1]), out


def test_ctrl_c_stops_every_worker_at_the_same_step_and_saves(stopped_run):
    _, where, step, out = stopped_run
    run = where / "runs" / "tiny"
    saved = load_resume(run)
    assert saved.world_size == 2 and saved.step == step >= 10  # both workers' state, where they stopped
    last = log_rows(run)[-1]
    assert (last["type"], last["step"]) == ("val", step)
    assert out.count("stopped (interrupted)") == 1


def test_a_two_worker_run_resumes_bit_for_bit(tmp_path, stopped_run):
    data, stopped, step, _ = stopped_run
    until = str(step + 6)
    resumed_in = tmp_path / "resumed"
    shutil.copytree(stopped, resumed_in)
    resumed = resume_torchrun(resumed_in, "--max-steps", until)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {step}" in resumed.stdout and "stream split" not in resumed.stdout
    straight = torchrun(data, tmp_path / "straight", *DROPOUT_RUN, "--max-steps", until)
    assert straight.returncode == 0, straight.stderr

    a = load_file(str(tmp_path / "straight" / "runs" / "tiny" / RESUME_FILE))
    b = load_file(str(resumed_in / "runs" / "tiny" / RESUME_FILE))
    assert sorted(a) == sorted(b) and "rng.cpu.1" in a
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights, optimizer, all streams' state, both generators


def test_resuming_with_another_number_of_workers_says_the_split_changed(tmp_path, stopped_run, capsys):
    _, stopped, step, _ = stopped_run
    shutil.copytree(stopped, tmp_path / "copy")
    run = tmp_path / "copy" / "runs" / "tiny"
    result = train(config_from_resume(run, run_dir=str(run), model_store=str(tmp_path / "copy" / "store"),
                                      max_steps=step + 3), resume_from=run)
    assert result.steps == step + 3
    out = capsys.readouterr().out
    assert "resuming with 1 worker(s) where the run had 2: the stream split changed" in out
    assert load_resume(run).world_size == 1 and load_resume(run).hidden[0].shape == (2, 8, 32)
def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path, shakespeare_slice, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(DataError, match="--batch-size 8 does not split into 3 equal shares"):
        train(tiny_config(tmp_path, shakespeare_slice))  # refused before it waits for the other workers


def test_the_world_comes_from_torchruns_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert World.from_env() == World()  # a plain `charrnn train`: one process, nothing shared
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    world = World.from_env()
    assert (world.rank, world.size, world.local_rank, world.local_size, world.is_main) == (3, 4, 1, 2, False)
    assert world.rows(64) == (48, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_worker_makes_the_others_stop_with_an_error(tmp_path, shakespeare_slice):
    # two machines, as README's multi-machine command (each torchrun watches only the worker it started)
    endpoint, run = f"127.0.0.1:{free_port()}", tmp_path / "runs" / "tiny"
    command = torchrun_command(shakespeare_slice, tmp_path, "--max-steps", "100000", launch=[
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint])
    machines = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
                for _ in range(2)]
    try:
        wait_for(lambda: (run / "log.jsonl").exists(), 60, "the first steps")
        workers = [workers_of(machine.pid) for machine in machines]
        victim = next(i for i, w in enumerate(workers) if 1 in w)  # the machine whose worker is rank 1
        os.kill(workers[victim][1], signal.SIGKILL)
        killed = time.monotonic()
        errors = [machine.communicate(timeout=60)[1] for machine in machines]
        took = time.monotonic() - killed
    finally:
        for machine in machines:
            machine.kill()
    assert all(machine.returncode != 0 for machine in machines) and took < 60
    survivor = errors[1 - victim]
    assert "error: worker 0 of 2 lost the others" in survivor and "by peer" in survivor  # gloo: closed, or reset
    assert not any(alive(pid) for w in workers for pid in w.values())


def test_a_worker_that_stops_answering_is_a_clear_error_after_the_timeout(tmp_path, shakespeare_slice):
    run = tmp_path / "runs" / "tiny"
    proc = subprocess.Popen(torchrun_command(shakespeare_slice, tmp_path, "--max-steps", "100000",
                                             "--dist-timeout", "0.1"),  # 6 s
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for(lambda: (run / "log.jsonl").exists(), 60, "the first steps")
        workers = workers_of(proc.pid)
        os.kill(workers[1], signal.SIGSTOP)  # alive but silent: no closed connection tells rank 0
        silenced = time.monotonic()
        wait_for(lambda: not alive(workers[0]), 60, "rank 0 to give up")
        waited = time.monotonic() - silenced
        os.kill(workers[1], signal.SIGCONT)  # so that torchrun's SIGTERM reaches it
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert 5 < waited < 40 and proc.returncode != 0
    assert "error: worker 0 of 2 lost the others" in err and "--dist-timeout (0.1 minutes)" in err
    assert not any(alive(pid) for pid in workers.values())

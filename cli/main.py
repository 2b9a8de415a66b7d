"""The `charrnn` command: `train`, `sample`, `evaluate`, `choose-start`, `info` and `serve`, on top of the core, the
trainer and the service.

    charrnn train --data input.txt --name mytext
    charrnn sample mytext --prime "ROMEO:" --temperature 0.8 --length 500 --seed 1
    charrnn info model_store/shakespeare.safetensors
    charrnn serve --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from charrnn.runtime import reexec_with_allocator_env

app = typer.Typer(help="Character-level RNN language models: train, sample, serve.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _resolve_checkpoint(model: str, model_store: Optional[Path]) -> Path:
    """A model name in the store, or a path to a .safetensors file."""
    from charrnn.checkpoint import default_model_store, model_path

    if model.endswith(".safetensors") or os.sep in model:
        return Path(model)
    try:
        return model_path(model_store or default_model_store(), model)
    except ValueError as e:
        _fail(str(e))


@app.command()
def train(
    data: Annotated[Optional[Path], typer.Option(help="UTF-8 text file to train on.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name: the checkpoint is <model-store>/<name>.safetensors [default: the data file's name without its extension].")] = None,
    model_store: Annotated[Optional[Path], typer.Option(help="Checkpoint folder [default: $CHARRNN_MODEL_STORE or model_store/].")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Run folder for log, loss curve, resume state [default: runs/<name>].")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder exactly where it last saved.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Start over even if the run folder already holds a run.")] = False,
    cell: Annotated[Optional[str], typer.Option(help="lstm, gru or rnn.")] = None,
    layers: Annotated[Optional[int], typer.Option(min=1, help="Stacked layers [default: 2, or sized to --max-minutes].")] = None,
    hidden: Annotated[Optional[int], typer.Option(min=1, help="Units per layer [default: 512, or sized to --max-minutes].")] = None,
    embed: Annotated[Optional[int], typer.Option(min=1, help="Character embedding size [default: 64].")] = None,
    dropout: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help="Between layers and before the output layer [default: 0.2].")] = None,
    learn_start: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help="Train the start state with the model: each stream is reset to it with this chance per batch [default: 0, off].")] = None,
    choose_start: Annotated[Optional[bool], typer.Option("--choose-start/--no-choose-start", help="When the run ends, measure the candidate start states and store the best in the checkpoint [default: on].")] = None,
    locked_dropout: Annotated[Optional[bool], typer.Option("--locked-dropout/--no-locked-dropout", help="One --dropout mask per sequence for all its steps (variational).")] = None,
    weight_drop: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help="DropConnect on the hidden-to-hidden weights [default: 0].")] = None,
    embed_drop: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help="Drop whole characters' embeddings [default: 0].")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(min=0.0, help="Decoupled weight decay (AdamW) [default: 0].")] = None,
    optim: Annotated[Optional[str], typer.Option(help="adam or rmsprop.")] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0)] = None,
    schedule: Annotated[Optional[str], typer.Option(help="decay (char-rnn's, per epoch) or cosine (warmup, then down to lr/10 at the end of the run or of --max-minutes).")] = None,
    lr_decay: Annotated[Optional[float], typer.Option(help="Per-epoch factor once --decay-after epochs have passed.")] = None,
    decay_after: Annotated[Optional[float], typer.Option(help="Epochs at the full learning rate.")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(min=0, help="Linear warmup steps (--schedule cosine).")] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Max global gradient norm.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(min=1, help="Characters per truncated-BPTT chunk.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Parallel streams per batch.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(min=1, help="Steps between validation passes and saves (also by the clock: the first within 20 s, then every minute).")] = None,
    max_epochs: Annotated[Optional[float], typer.Option(help="Stop after this many epochs.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop cleanly after this wall-clock budget; without size flags, a speed probe picks the model size it can train.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps in all.")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Torch CPU threads [default: the CPUs this process may use].")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 on CUDA; on a CPU with bf16 units, the faster of the two, timed), fp32 or bf16 autocast.")] = None,
    val_frac: Annotated[Optional[float], typer.Option(help="Last fraction of the text held out for validation.")] = None,
    sample_every: Annotated[Optional[int], typer.Option(help="Print and log a sample every N steps (0 = never).")] = None,
    sample_length: Annotated[Optional[int], typer.Option(min=1)] = None,
    save_dtype: Annotated[Optional[str], typer.Option(help="Weights in the checkpoint: fp32, fp16 or bf16.")] = None,
    dist_timeout: Annotated[Optional[float], typer.Option(help="Under torchrun: minutes a worker waits for the "
                                                          "others before it fails [default: 10].")] = None,
) -> None:
    """Train a model on a text file; the best checkpoint by validation loss lands in the model store.

    Options left out take the trainer's defaults (TrainConfig in training/train.py; README, "Train").
    Under `torchrun --nproc-per-node N -m charrnn train ...`, N workers train one model (README).
    """
    from charrnn.checkpoint import CheckpointError
    from training.data import DataError
    from training.distributed import WorkerError
    from training.train import TrainConfig, config_from_resume
    from training.train import train as run_training

    def given(**options) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if v is not None}

    try:
        if resume is not None:
            # The run's own settings are kept; only the budget, device and data path may be given again.
            cfg = config_from_resume(resume, run_dir=str(resume), **given(
                data=data, max_epochs=max_epochs, max_minutes=max_minutes, max_steps=max_steps, device=device,
                threads=threads, sample_every=sample_every, model_store=model_store, dist_timeout=dist_timeout))
        else:
            if data is None:
                _fail("--data is required (or --resume RUN_DIR)")
            cfg = TrainConfig(name=name or data.stem, **given(
                data=data, model_store=model_store, run_dir=run_dir, cell=cell, layers=layers, hidden=hidden,
                embed=embed, dropout=dropout, learn_start=learn_start, choose_start=choose_start,
                locked_dropout=locked_dropout, weight_drop=weight_drop,
                embed_drop=embed_drop, weight_decay=weight_decay, optim=optim, lr=lr, schedule=schedule,
                lr_decay=lr_decay, decay_after=decay_after, warmup_steps=warmup_steps,
                grad_clip=grad_clip, seq_len=seq_len, batch_size=batch_size, eval_every=eval_every,
                max_epochs=max_epochs, max_minutes=max_minutes, max_steps=max_steps, seed=seed, device=device,
                threads=threads, precision=precision, val_frac=val_frac, sample_every=sample_every,
                sample_length=sample_length, save_dtype=save_dtype, dist_timeout=dist_timeout))
        run_training(cfg, resume_from=resume, overwrite=overwrite)
    except (DataError, CheckpointError, ValueError, WorkerError) as e:
        _fail(str(e))


@app.command()
def sample(
    model: Annotated[str, typer.Argument(help="Model name in the store, or a path to a .safetensors file.")],
    prime: Annotated[str, typer.Option(help="Text to start from (warms the state).")] = "",
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = argmax; higher = more surprising.")] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Sample only from the k most likely characters.")] = None,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = None,
    length: Annotated[int, typer.Option(min=0, help="Characters to generate.")] = 500,
    seed: Annotated[Optional[int], typer.Option(help="Same seed, same text.")] = None,
    skip_unknown: Annotated[bool, typer.Option(help="Drop prime characters the model does not know.")] = False,
    model_store: Annotated[Optional[Path], typer.Option(help="Checkpoint folder [default: $CHARRNN_MODEL_STORE or model_store/].")] = None,
    precision: Annotated[str, typer.Option(help="auto (bf16 where the CPU has bf16 units, as the server), fp32 or bf16.")] = "auto",
) -> None:
    """Generate text from a trained model, streaming characters to stdout as they are drawn.

    The same engine, sampling and seed handling as the server: with the same precision, the same seed
    gives the same text here and from `POST /generate`.
    """
    import math

    from charrnn.checkpoint import CheckpointError, load_model
    from charrnn.engine import Engine
    from charrnn.vocab import UnknownCharactersError

    if not math.isfinite(temperature):
        _fail("--temperature must be a finite number")
    path = _resolve_checkpoint(model, model_store)
    try:
        net, vocab, _ = load_model(path)
        engine = Engine(net, precision)
        missing = [] if skip_unknown else vocab.unknown(prime)
        if missing:  # refuse before anything is written to stdout
            raise UnknownCharactersError(missing)
        sys.stdout.write(prime)
        for char in engine.generate(vocab, prime, length, temperature, top_k, top_p, seed, skip_unknown):
            sys.stdout.write(char)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except UnknownCharactersError as e:
        _fail(f"the prime has {e}; pass --skip-unknown to drop them")
    except (CheckpointError, ValueError) as e:
        _fail(str(e))


def _dynamic_report(dyn, held_out_chars: int) -> dict:
    """A training.evaluate.DynamicResult as JSON: the lr chosen on the first half, both losses on the second."""
    from training.evaluate import SEGMENT

    return {"held_out_chars": held_out_chars, "segment": SEGMENT, "lr": dyn.lr,
            "lr_grid": {str(lr): round(nats, 5) if nats < float("inf") else None for lr, nats in dyn.tuning.items()},
            "tuned_on_chars": dyn.tuned_chars, "reported_on_chars": held_out_chars - dyn.tuned_chars,
            "static_loss": round(dyn.static.nats, 5), "static_bpc": round(dyn.static.bits, 5),
            "dynamic_loss": round(dyn.dynamic.nats, 5), "dynamic_bpc": round(dyn.dynamic.bits, 5),
            "scored_chars": dyn.dynamic.chars}


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="Model name in the store, or a path to a .safetensors file.")],
    data: Annotated[Path, typer.Option(help="UTF-8 text; the loss is measured on its held-out part.")],
    protocol: Annotated[str, typer.Option(help="stream: the trainer's (contiguous streams from the model's start, "
                                                "state carried); windows: nanoGPT's (random windows from the zero "
                                                "state); start: the first 32 characters of held-out lines, read from "
                                                "the model's start and from zeros.")] = "stream",
    dynamic: Annotated[bool, typer.Option(help="Also dynamic evaluation (SGD while reading), beside the static "
                                                "loss of the same half of the held-out text.")] = False,
    dynamic_lr: Annotated[Optional[float], typer.Option(min=0.0, help="SGD learning rate for --dynamic "
                                                        "(default: the best of a grid on the first half).")] = None,
    dynamic_chars: Annotated[Optional[int], typer.Option(min=4, help="Use only the first N held-out characters "
                                                         "for --dynamic (default: all).")] = None,
    windows: Annotated[int, typer.Option(min=1, help="Random windows for --protocol windows, drawn --batch-size "
                                                     "at a time (nanoGPT: 200 x 64).")] = 12_800,
    window: Annotated[int, typer.Option(min=1, help="Characters per window.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the window starts.")] = 1337,
    val_frac: Annotated[Optional[float], typer.Option(help="Last fraction of the text to measure on "
                                                      "(default: the model's own, as trained, else 0.1).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Streams (default: the model's own, as "
                                                      "trained, else 64), or windows per batch (default: 64).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(min=1, help="Characters per chunk of a stream (default: the "
                                                   "model's own, else 128).")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when there is one), cpu or cuda.")] = "auto",
    model_store: Annotated[Optional[Path], typer.Option(help="Checkpoint folder.")] = None,
) -> None:
    """Held-out loss of a checkpoint as stored (e.g. fp16 weights, read as fp32), in nats and bits per character.

    The checkpoint is only read. Protocols and dynamic evaluation: training/evaluate.py.
    """
    import time

    import torch

    from charrnn.checkpoint import CheckpointError, load_model
    from charrnn.runtime import available_cpus
    from charrnn.vocab import UnknownCharactersError
    from training.data import DataError, load_text, split, val_batches
    from training.evaluate import WINDOW_BATCH_SIZE, dynamic_evaluation, stream_loss, windows_loss
    from training.start import PASSAGE_CHARS, passages, start_loss
    from training.train import resolve_device

    if protocol not in ("stream", "windows", "start"):
        _fail(f"--protocol must be stream, windows or start, not {protocol!r}")
    if protocol == "windows" and windows % (batch_size or WINDOW_BATCH_SIZE):
        _fail(f"--windows ({windows}) must be a multiple of --batch-size ({batch_size or WINDOW_BATCH_SIZE}): "
              "windows are drawn --batch-size at a time")
    if not dynamic and (dynamic_lr is not None or dynamic_chars is not None):
        _fail("--dynamic-lr and --dynamic-chars go with --dynamic")
    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device must be auto, cpu or cuda, not {device!r}")
    torch.set_num_threads(available_cpus())
    try:
        dev = resolve_device(device)
        torch.backends.cudnn.allow_tf32 = False  # fp32 throughout: cuDNN would round the LSTM's products to TF32
        net, vocab, info = load_model(_resolve_checkpoint(model, model_store), str(dev))
        trained = info.training.get("train_config", {})  # by default, measure as the trainer did
        val_frac = trained.get("val_frac", 0.1) if val_frac is None else val_frac
        corpus = load_text(data)
        ids = torch.from_numpy(vocab.encode(corpus.text))
        _, val = split(ids, val_frac)
        started = time.monotonic()
        if protocol == "stream":
            batch_size, seq_len = batch_size or trained.get("batch_size", 64), seq_len or trained.get("seq_len", 128)
            loss = stream_loss(net, val, batch_size, seq_len)
            streams = val_batches(val, batch_size, seq_len)
            shape = {"streams": streams.batch_size, "seq_len": streams.seq_len, "start": info.start["kind"]}
        elif protocol == "start":
            texts = passages(val, vocab)
            loss = start_loss(net, texts, net.start_state(1))
            zero = start_loss(net, texts, net.init_state(1))
            at = [p for p in (0, 1, 2, 3, 4, 8, 16) if p < PASSAGE_CHARS] + [PASSAGE_CHARS - 1]
            shape = {"start": info.start["kind"], "passages": loss.passages, "predicted_chars": PASSAGE_CHARS,
                     "loss_at_position": {str(p): round(loss.by_position[p], 4) for p in at},
                     "zero_start_loss": round(zero.nats, 5),
                     "zero_start_loss_at_position": {str(p): round(zero.by_position[p], 4) for p in at}}
        else:
            batch_size = batch_size or WINDOW_BATCH_SIZE
            loss = windows_loss(net, val, window, windows // batch_size, batch_size, seed)
            at = [p for p in (0, 1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512) if p < window] + [window - 1]
            shape = {"windows": loss.windows, "window": window, "seed": seed,
                     "loss_at_position": {str(p): round(loss.by_position[p], 4) for p in at}}
        result = {"protocol": protocol, "val_loss": round(loss.nats, 5), "val_bpc": round(loss.bits, 5),
                  "val_chars": len(val), "scored_chars": loss.chars, **shape, "val_frac": val_frac,
                  "seconds": round(time.monotonic() - started, 1), "device": dev.type,
                  "weights_dtype": info.training.get("weights_dtype"),
                  "recorded_val_loss": info.training.get("best_val_loss")}
        if dynamic:
            started = time.monotonic()
            text = val[:dynamic_chars] if dynamic_chars else val
            result["dynamic"] = _dynamic_report(dynamic_evaluation(net, text, dynamic_lr), len(text))
            result["dynamic"]["seconds"] = round(time.monotonic() - started, 1)
    except UnknownCharactersError as e:
        _fail(f"the text has {e}")
    except (CheckpointError, DataError) as e:
        _fail(str(e))
    print(json.dumps(result, indent=2))


@app.command("choose-start")
def choose_start(
    model: Annotated[str, typer.Argument(help="Model name in the store, or a path to a .safetensors file.")],
    data: Annotated[Path, typer.Option(help="The UTF-8 text the model was trained on.")],
    val_frac: Annotated[Optional[float], typer.Option(help="Last fraction of the text held out (default: the "
                                                      "model's own, as trained, else 0.1).")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when there is one), cpu or cuda.")] = "auto",
    model_store: Annotated[Optional[Path], typer.Option(help="Checkpoint folder.")] = None,
) -> None:
    """Choose where the model's new texts start: measure the candidate start states and store the best in the
    checkpoint (its weights unchanged). The trainer does this when a run ends; this does it for any checkpoint.

    Candidates and metric: training/start.py (docs/models.md, "Where a text starts").
    """
    import torch

    from charrnn.checkpoint import CheckpointError, read_metadata
    from charrnn.runtime import available_cpus
    from charrnn.vocab import UnknownCharactersError, Vocab
    from training.data import DataError, load_text, split
    from training.start import choose_for_checkpoint
    from training.train import resolve_device

    torch.set_num_threads(available_cpus())
    path = _resolve_checkpoint(model, model_store)
    try:
        meta = read_metadata(path)
        dev = resolve_device(device)
        val_frac = meta.training.get("train_config", {}).get("val_frac", 0.1) if val_frac is None else val_frac
        ids = torch.from_numpy(Vocab(meta.vocab).encode(load_text(data).text))
        train_ids, val_ids = split(ids, val_frac)
        start = choose_for_checkpoint(path, train_ids, val_ids, dev, log=lambda line: print(line, file=sys.stderr))
    except UnknownCharactersError as e:
        _fail(f"the text has {e}")
    except (CheckpointError, DataError) as e:
        _fail(str(e))
    print(json.dumps(start, indent=2))


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Model name in the store, or a path to a .safetensors file.")],
    model_store: Annotated[Optional[Path], typer.Option(help="Checkpoint folder.")] = None,
) -> None:
    """Print a checkpoint's config, vocabulary, training facts and start (reads the header only)."""
    from charrnn.checkpoint import CheckpointError, read_metadata

    try:
        meta = read_metadata(_resolve_checkpoint(model, model_store))
    except CheckpointError as e:
        _fail(str(e))
    print(json.dumps({"config": meta.config, "vocab": "".join(meta.vocab), "training": meta.training,
                      "start": meta.start}, indent=2, ensure_ascii=False))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    model_store: Annotated[Optional[Path], typer.Option(help="Checkpoint folder [default: $CHARRNN_MODEL_STORE or model_store/].")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    loop: Annotated[str, typer.Option(help="Event loop: auto (uvloop when installed), uvloop or asyncio.")] = "auto",
    http: Annotated[str, typer.Option(help="HTTP parser: auto (httptools), httptools or h11.")] = "auto",
) -> None:
    """Serve every model of the model store over HTTP (one process; scale with replicas).

    Start the service this way, not with `uvicorn app.main:app`: only here are connections guarded, with
    CHARRNN_HEADER_TIMEOUT_S, CHARRNN_KEEP_ALIVE_S and CHARRNN_MAX_CONNECTIONS, the open-file limit raised and
    the log of failed accept() calls bounded (app/connections.py).
    """
    import logging

    import uvicorn

    if model_store is not None:
        os.environ["CHARRNN_MODEL_STORE"] = str(model_store)
    from app.connections import connection_cap, limit_accept_error_log, protocol_class, raise_open_file_limit
    from app.settings import Settings

    if loop not in ("auto", "uvloop", "asyncio") or http not in ("auto", "httptools", "h11"):
        _fail("--loop is auto, uvloop or asyncio; --http is auto, httptools or h11")
    settings = Settings()
    open_files = raise_open_file_limit()
    cap = connection_cap(settings.max_connections, open_files)
    if cap < settings.max_connections:
        typer.secho(f"warning: {cap} connections at most (CHARRNN_MAX_CONNECTIONS is {settings.max_connections}): "
                    f"the open-file limit is {open_files}", fg=typer.colors.YELLOW, err=True)
    limit_accept_error_log()
    uvicorn.run(
        "app.main:app",
        host=host,
        port=port,
        workers=1,  # sessions and decode loops live in the process
        log_level=log_level,
        loop=loop,
        http=protocol_class(settings.header_timeout_s, cap, http),
        timeout_keep_alive=settings.keep_alive_s,
        access_log=False,  # the app logs each request as JSON, with its request id (app/middleware.py)
        # Streams get `shutdown_grace_s` to receive their final event; uvicorn waits a little longer.
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 2,
    )
    # The app has shut down (streams ended, sessions saved, stores closed): leave now. Python's own
    # finalization would still join the executors' threads (a DNS lookup stuck in its resolver's timeouts
    # among them, app/main.py) and run torch's and OpenMP's destructors for the threads that ran torch, which
    # can wait past a container's stop grace period; nothing is left to save.
    # (Outside a container uvicorn has already re-raised the SIGTERM and the process ended with it.)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    """Console entry point: set the allocator variables (re-exec once), then run the command."""
    reexec_with_allocator_env(["-m", "cli", *sys.argv[1:]])
    app(prog_name="charrnn")


if __name__ == "__main__":
    main()

"""Process-level settings that must be in place before torch allocates anything."""

from __future__ import annotations

import os
import sys

# glibc hands oneDNN's large per-call temporaries back to the OS on every LSTM call (page faults, zeroing);
# keeping them mapped made 2x256 training 1.65x faster on our 2-core CPUs. Both variables are needed, and
# they only act at process start, hence the re-exec below.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def allocator_env_missing() -> bool:
    return any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items())


def reexec_with_allocator_env(argv: list[str]) -> None:
    """Replace this process with `argv` run under the allocator settings (once; CHARRNN_NO_REEXEC=1 opts out)."""
    if os.environ.get("CHARRNN_NO_REEXEC") == "1" or not allocator_env_missing():
        return
    env = {**os.environ, **ALLOCATOR_ENV, "CHARRNN_NO_REEXEC": "1"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)

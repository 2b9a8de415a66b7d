"""Process-level settings that must be in place before torch allocates anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU limit of this process's cgroup (a container's `--cpus`), or None when there is none."""
    try:  # cgroup v2: "max 100000" or "150000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (rounded down, at least 1).

    `os.cpu_count()` and torch's default thread count see every CPU of the host, also inside a container
    limited to two of them, where that many threads would wait on each other.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, int(quota))
    return max(1, cpus)

"""How many CPUs the process may use, and the thread counts the server derives from it."""

from __future__ import annotations

import os

import pytest

from app.settings import Settings
from charrnn.runtime import available_cpus, cgroup_cpu_quota


@pytest.mark.parametrize("content, expected", [("max 100000\n", None), ("150000 100000\n", 1.5),
                                               ("200000 100000\n", 2.0)])
def test_cgroup_v2_quota(tmp_path, content, expected):
    (tmp_path / "cpu.max").write_text(content)
    assert cgroup_cpu_quota(tmp_path) == expected


def test_cgroup_v1_quota_and_no_cgroup(tmp_path):
    assert cgroup_cpu_quota(tmp_path) is None  # no files: no limit
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cgroup_cpu_quota(tmp_path) == 3.0


def test_available_cpus_follows_the_affinity_mask():
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert available_cpus() == 1
        assert Settings().decode_threads() == 1  # never fewer than one
    finally:
        os.sched_setaffinity(0, before)
    assert available_cpus() == min(len(before), int(cgroup_cpu_quota() or len(before)))


def test_decode_threads_leave_a_cpu_to_the_event_loop(monkeypatch):
    monkeypatch.delenv("CHARRNN_THREADS", raising=False)
    assert Settings().decode_threads() == max(1, available_cpus() - 1)
    monkeypatch.setenv("CHARRNN_THREADS", "3")
    assert Settings().decode_threads() == 3

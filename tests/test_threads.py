import os

import pytest
import torch

from shapkern import threads
from shapkern.threads import ThreadChoice, apply_thread_policy, choose_threads, usable_cores


def test_the_policy_leaves_the_cores_the_load_takes():
    quiet = choose_threads(environ={}, cores=2, machine_cores=2, load=0.2)
    assert quiet == ThreadChoice(2, "2 cores, load 0.2") and str(quiet) == "2 threads (2 cores, load 0.2)"
    assert choose_threads(environ={}, cores=2, machine_cores=2, load=1.0).threads == 1  # one busy process
    loaded = choose_threads(environ={}, cores=2, machine_cores=2, load=3.1)
    assert str(loaded) == "1 thread (2 cores, load 3.1)"  # never fewer than one
    # The load is the machine's: 30 busy of 64 cores leave this process's 8 all free.
    assert choose_threads(environ={}, cores=8, machine_cores=64, load=30.0).threads == 8


def test_processes_of_one_torchrun_share_the_cores():
    choice = choose_threads(environ={"LOCAL_WORLD_SIZE": "2"}, cores=8, machine_cores=8, load=0.0)
    assert choice == ThreadChoice(4, "8 cores / 2 processes, load 0.0")


def test_an_explicit_count_then_the_environment_win(monkeypatch):
    assert choose_threads(3, environ={"OMP_NUM_THREADS": "1"}, load=9.0) == ThreadChoice(3, "--threads")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        choice = choose_threads(environ={name: "1"}, cores=2, machine_cores=2, load=0.0)
        assert choice == ThreadChoice(torch.get_num_threads(), f"{name}=1")  # torch read it: left as is
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="--threads must be a positive int"):
            choose_threads(bad)


def test_no_load_average_means_the_usable_cores(monkeypatch):
    monkeypatch.setattr(threads, "_load", lambda: None)
    assert choose_threads(environ={}, cores=3) == ThreadChoice(3, "3 cores")


def test_usable_cores_take_the_affinity_one_per_physical_core_and_the_quota(monkeypatch, tmp_path):
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
    cpus = threads._affinity()
    if cpus:
        assert 1 <= threads._physical(cpus) <= len(cpus)
    monkeypatch.setattr(threads, "_affinity", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "_physical", lambda cpus: len(cpus) // 2)  # two hyper-threads per core
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert usable_cores() == 2
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1)
    assert usable_cores() == 1


def test_cgroup_quotas_are_read_in_both_versions(tmp_path):
    assert threads._cgroup_quota(tmp_path) is None  # no cgroup files
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads._cgroup_quota(tmp_path) is None  # v1, no quota
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    assert threads._cgroup_quota(tmp_path) == 3  # v1: 2.5 CPUs' worth
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_quota(tmp_path) is None  # v2 first
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads._cgroup_quota(tmp_path) == 2


def test_apply_sets_torch_s_threads_and_says_why(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert apply_thread_policy(1) == ThreadChoice(1, "--threads") and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads, "_load", lambda: 50.0)
        choice = apply_thread_policy()
        assert choice.threads == 1 and "load 50.0" in choice.reason and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

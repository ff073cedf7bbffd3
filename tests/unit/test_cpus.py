"""-workers=auto: the CPUs the process may use (httptp.cpus).

The cgroup v2 files are fixtures written here, laid out as the kernel shows
them: ``/proc/self/cgroup`` with its ``0::/path`` line, and one ``cpu.max``
per cgroup directory (none at the root of the host's hierarchy).  The real
affinity mask is tested with taskset in tests/process/test_workers_auto.py.
"""

from __future__ import annotations

import os

import pytest

from httptp import cpus, settings


def _tree(tmp_path, own: str, limits: dict[str, str], proc: str | None = None):
    """A cgroup root under tmp_path with ``cpu.max`` files at the given paths;
    returns (cgroup_root, proc_cgroup)."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for path, text in limits.items():
        d = root / path.strip("/") if path.strip("/") else root
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(text)
    (root / own.strip("/")).mkdir(parents=True, exist_ok=True)
    proc_file = tmp_path / "proc-self-cgroup"
    proc_file.write_text(proc if proc is not None else f"0::{own}\n")
    return str(root), str(proc_file)


@pytest.mark.parametrize("text, want", [
    ("max 100000\n", None),
    ("150000 100000\n", 1.5),
    ("200000 100000", 2.0),
    ("50000 100000\n", 0.5),
    ("100000\n", 1.0),                 # the period defaults to 100 ms
    ("", None), ("junk 1", None), ("0 100000", None), ("100 0", None), (None, None),
])
def test_parse_cpu_max(text, want):
    assert cpus.parse_cpu_max(text) == want


def test_a_container_quota_rounds_up(tmp_path):
    """Docker --cpus=1.5 with a cgroup namespace: our cgroup is the root we see."""
    root, proc = _tree(tmp_path, "/", {"/": "150000 100000\n"})
    assert cpus.cgroup_cpu_limit(root, proc) == 1.5
    assert cpus.available_cpus(root, proc) == min(2, len(os.sched_getaffinity(0)))


def test_the_tightest_ancestor_wins(tmp_path):
    """A slice's limit applies to every service in it, whatever the service's own says."""
    root, proc = _tree(tmp_path, "/system.slice/httptp.service",
                       {"/system.slice": "100000 100000\n",
                        "/system.slice/httptp.service": "max 100000\n"})
    assert cpus.cgroup_cpu_limit(root, proc) == 1.0
    assert cpus.available_cpus(root, proc) == 1


def test_own_limit_tighter_than_the_parent(tmp_path):
    root, proc = _tree(tmp_path, "/kubepods/pod1/c1",
                       {"/kubepods": "400000 100000", "/kubepods/pod1": "max 100000",
                        "/kubepods/pod1/c1": "25000 100000"})
    assert cpus.cgroup_cpu_limit(root, proc) == 0.25
    assert cpus.available_cpus(root, proc) == 1          # never 0


def test_no_limit_is_the_affinity_mask(tmp_path):
    root, proc = _tree(tmp_path, "/user.slice", {"/user.slice": "max 100000\n"})
    assert cpus.cgroup_cpu_limit(root, proc) is None
    assert cpus.available_cpus(root, proc) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("proc", [
    "",                                               # empty
    "12:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n",  # cgroup v1 only: not read
    "0::relative\n",
])
def test_no_cgroup_v2_line_means_no_limit(tmp_path, proc):
    root, proc_file = _tree(tmp_path, "/", {"/": "100000 100000"}, proc=proc)
    assert cpus.cgroup_cpu_limit(root, proc_file) is None


def test_missing_files_mean_no_limit(tmp_path):
    assert cpus.cgroup_cpu_limit(str(tmp_path / "none"), str(tmp_path / "none")) is None
    assert cpus.available_cpus(str(tmp_path / "none"), str(tmp_path / "none")) == \
        len(os.sched_getaffinity(0))


def test_a_path_outside_the_namespace_reads_only_its_root(tmp_path):
    """/proc/self/cgroup shows ``/../x`` for a cgroup outside our namespace."""
    root, proc = _tree(tmp_path, "/", {"/": "300000 100000"}, proc="0::/../sibling\n")
    assert cpus.cgroup_cpu_limit(root, proc) == 3.0


def test_workers_auto_is_available_cpus():
    assert settings.parse_workers("auto") == cpus.available_cpus()
    assert settings.parse_workers("3") == 3

"""-workers=auto under taskset: the real httptp starts one worker per CPU of
its affinity mask, not per CPU of the machine.  (The cgroup quota is
unit-tested with fixture files in tests/unit/test_cpus.py: a test cannot
create a cgroup here.)"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.helpers import HttpTp, wait_until

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux)")]


def _workers_auto_on(cpus: list[int]) -> HttpTp:
    """No request is sent: the upstream is never dialled."""
    return HttpTp("-outType=http", "-out=127.0.0.1:1", "-workers=auto", workers=len(cpus),
                  wrap=["taskset", "-c", ",".join(map(str, cpus))])


def test_taskset_one_cpu_starts_one_worker():
    cpu = min(os.sched_getaffinity(0))
    with _workers_auto_on([cpu]) as p:
        assert wait_until(lambda: "ready: 1 workers" in p.output, 15), p.output
        assert len(p.worker_pids()) == 1


def test_taskset_two_cpus_starts_two_workers():
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("this machine lets the tests use one CPU")
    with _workers_auto_on(cpus) as p:
        assert wait_until(lambda: "ready: 2 workers" in p.output, 15), p.output
        assert len(p.worker_pids()) == 2

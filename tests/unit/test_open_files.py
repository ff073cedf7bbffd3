"""supervisor.procs.raise_open_files: soft RLIMIT_NOFILE up to the hard limit,
and nginx's warning when -concurrency cannot fit under it."""

import resource

from httptp.supervisor.procs import raise_open_files


def test_soft_limit_raised_to_hard_and_warning_when_concurrency_does_not_fit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_open_files(100, 1) is None
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        if hard != resource.RLIM_INFINITY:
            warning = raise_open_files(4 * hard, 2)
            assert f"{hard:,}" in warning and "-concurrency" in warning
            assert raise_open_files(hard, 2) is None        # hard / 2 each: fits
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

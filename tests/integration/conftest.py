"""Integration fixtures shared by every engineer's integration tests.

`ray_cluster`: ONE local Ray head per test session (started on first use through
`linearsr.dev.local_ray`, stopped at the end), with 8 logical CPUs so several small jobs fit at
once (jobs ask for fractions: `entrypoint_num_cpus=0.5`, `cluster.cpus_per_worker=0.5`).
It yields the Jobs API URL (`http://127.0.0.1:PORT`); use it with `linearsr.cluster.jobs.Jobs`
or `--ray-address`. Its Ray temp dir is private, so a test's own `ray.init()` never attaches
to it by accident. RAY_ADDRESS is not set: pass the address explicitly."""

import pytest

RAY_TEST_CPUS = 8


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    from linearsr.dev import local_ray as local

    state_dir = str(tmp_path_factory.mktemp("ray"))
    cluster = local.start(state_dir, num_cpus=RAY_TEST_CPUS)
    try:
        yield cluster.jobs_address
    finally:
        local.stop(state_dir)

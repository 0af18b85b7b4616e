"""Ray fixtures for the job tests: one local Ray per test session, started by the tests."""

from __future__ import annotations

from typing import Iterator

import pytest
import ray


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """A local Ray with 2 CPUs (as CI has); `jobs.run.connect_ray` reuses it. Token auth as
    `invariance run` sets it up (a token in the environment for the whole session, no token file):
    a Ray started without it wrote ~/.ray/auth_token, and a later start with another token in the
    environment failed (InvalidAuthToken)."""
    from jobs.run import local_ray_auth

    if not ray.is_initialized():
        local_ray_auth()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()

"""Ray fixtures for the job tests: one local Ray per test session, started by the tests."""

from __future__ import annotations

from typing import Iterator

import pytest
import ray


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """A local Ray with 2 CPUs (as CI has); `jobs.run.connect_ray` reuses it."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()

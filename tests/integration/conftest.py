"""Integration tests: real packets between real network namespaces (root only)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from caplance.lab import Lab


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "integration tests need root (network namespaces)"
    elif not all(shutil.which(tool) for tool in ("ip", "nft", "ethtool")):
        reason = "integration tests need iproute2, nftables and ethtool"
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=["python", "kernel"])
def both_planes(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once with each data plane (see ``services.use_plane``)."""
    from tests.integration import services

    services.use_plane(request.param)
    try:
        yield request.param
    finally:
        services.use_plane("python")


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A lab with a client, a balancer and three backends; removed even if the test fails."""
    with Lab(backends=3) as made:
        yield made

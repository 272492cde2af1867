"""The UCX tests' link fixture: each module runs once per `UCX_TLS` link of `ucx_helpers.LINKS`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.transport.ucx_helpers import LINKS, SECRET


@pytest.fixture(scope="module", params=list(LINKS), ids=[f"ucx-{k}" for k in LINKS])
def link(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every process of a test (the servers inherit it) runs UCX with this link's UCX_TLS."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("UCX_TLS", LINKS[request.param])
        env.setenv("UCX_NET_DEVICES", "lo")  # UCX's TCP transport listens on every device it may use
        env.setenv("FLEXEMR_SECRET", SECRET)
        yield request.param

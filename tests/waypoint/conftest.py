"""Fixtures for waypoint tests: a real CA (identity.ca) issuing real SVIDs."""

from __future__ import annotations

import datetime as dt

import pytest

from identity.ca import CertificateAuthority
from tests.tunnel.conftest import NOW, TD


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create_root(TD, NOW - dt.timedelta(minutes=5))

"""The embedded Ray as raydist starts it: its dashboard (which serves the State and Jobs APIs)
listens on loopback only, not on the machine's other addresses."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest

from raydist.runtime import connect

LISTEN = "0A"  # the TCP state in /proc/net/tcp


def listening(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at `port` (Linux's /proc/net/tcp, little-endian hex)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip, hex_port = local.split(":")
        if state == LISTEN and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(ip)[::-1]))
    return found


def outside_address() -> str | None:
    """The address this machine would reach other hosts from (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.ray
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_the_dashboard_listens_on_loopback_only(ray_local):
    port = urlparse(os.environ[connect.API_SERVER]).port
    assert listening(port) == {"127.0.0.1"}
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    address = outside_address()
    if address is not None:
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=5):
            pass

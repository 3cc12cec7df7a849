"""The socket guard really blocks non-loopback traffic and lets loopback through."""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import NetworkAccessError


def test_public_address_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(NetworkAccessError):
        s.connect(("93.184.216.34", 80))


def test_private_range_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(NetworkAccessError):
        s.connect_ex(("10.1.2.3", 104))


def test_name_resolution_outside_loopback_is_refused() -> None:
    with pytest.raises(NetworkAccessError):
        socket.getaddrinfo("huggingface.co", 443)


def test_loopback_is_allowed() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.connect(("127.0.0.1", port))


def test_hub_is_offline() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"

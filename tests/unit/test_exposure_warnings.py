"""Start-up warnings about an open Raft port or an open API (README: Security)."""

from __future__ import annotations

from flexcore.config import Settings
from flexcore.node import exposure_warnings

PEERS = ("10.0.0.1:7100", "10.0.0.2:7100", "10.0.0.3:7100")


def test_a_local_single_node_warns_about_nothing() -> None:
    assert exposure_warnings(Settings(), "127.0.0.1") == []


def test_a_cluster_without_secret_and_a_public_api_without_token_warn() -> None:
    settings = Settings(self_addr=PEERS[0], peers=PEERS, api="0.0.0.0:8100")
    raft, api = exposure_warnings(settings, "0.0.0.0")
    assert "no --secret" in raft and PEERS[0] in raft
    assert "no --api-token" in api and "0.0.0.0:8100" in api


def test_secret_and_token_silence_them() -> None:
    settings = Settings(self_addr=PEERS[0], peers=PEERS, api="0.0.0.0:8100",
                        secret="s3cret-cluster", api_token="t0ken")
    assert exposure_warnings(settings, "0.0.0.0") == []
    # A peer list naming only this node is a single-node cluster: no Raft peers to fear.
    alone = Settings(self_addr=PEERS[0], peers=PEERS[:1], api="[::1]:8100")
    assert exposure_warnings(alone, "[::1]") == []

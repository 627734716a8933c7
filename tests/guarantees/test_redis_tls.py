"""Managed Redis: ``rediss://`` (TLS, verified) and an ACL user in the URL, on one Redis and
on a Redis Cluster.

A ``redis-server`` of the test's own (or a cluster of three, ``tls-cluster yes``) that speaks
only TLS, with a certificate made by ``openssl`` for this test (its CA given as
``[redis] ca_file``), and whose default user is off: nothing works without the URL's user and
password, and nothing without the CA.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis_topologies import LocalCluster, local_cluster, tag_slot

from gateway.appkeys import LIMITER
from gateway.ratelimit.redis import key_names

from clients import chat_body
from conftest import KEY, OTHER_KEY, Upstream, settings_for
from servers import accepts, free_port, spawn, wait_until

USER, PASSWORD = "gwtls", "tls-test-secret-pw"
PREFIX = "gwtls"


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1: (ca, certificate, key)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = folder / "ca.crt", folder / "ca.key"
    cert, key, csr = folder / "server.crt", folder / "server.key", folder / "server.csr"
    openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "1",
            "-subj", "/CN=gateway test CA")
    openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "1",
            "-extfile", str(folder / "san.ext"))
    return ca, cert, key


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """(port, CA file) of a TLS-only redis-server with an ACL user."""
    ca, cert, key = make_certificates(tmp_path)
    port = free_port()
    proc = spawn(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                  "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                  "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
                  "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                  "--user", USER, "on", f">{PASSWORD}", f"~{PREFIX}:*", "+@all",
                  "--user", "default", "off"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is None and accepts(port), 10, "redis-server (TLS)")
        yield port, ca
    finally:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, Path]]:
    """(cluster, CA file): three TLS-only primaries, no replicas, whose cluster bus and
    replication are TLS too, with an ACL user and the default user off."""
    ca, cert, key = make_certificates(tmp_path)
    args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
            "--tls-cluster", "yes", "--tls-replication", "yes",
            "--user", USER, "on", f">{PASSWORD}", f"~{PREFIX}:*", "+@all",
            "--user", "default", "off"]
    connection = {"ssl": True, "ssl_ca_certs": str(ca), "username": USER, "password": PASSWORD}
    with local_cluster(tmp_path / "cluster", replicas=0, args=args, connection=connection,
                       cli_args=["--tls", "--cacert", str(ca), "--user", USER,
                                 "--pass", PASSWORD]) as cluster:
        yield cluster, ca


def redis_section(port: int, **more: Any) -> dict[str, Any]:
    return {"url": f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0", "key_prefix": PREFIX,
            "failure_policy": "fail_closed", "timeout_seconds": 1.0, **more}


async def post_chat(base: str, key: str = KEY) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.post(
            f"{base}/v1/chat/completions", json=chat_body(stream=False),
            headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.text()


async def test_rediss_with_its_ca_file_and_an_acl_user_limits_through_redis(
        tls_redis: tuple[int, Path], mock_upstream: Upstream,
        start_gateway: Callable[..., Any]) -> None:
    port, ca = tls_redis
    settings = settings_for(mock_upstream.url, redis=redis_section(port, ca_file=str(ca)))
    app, base = await start_gateway(settings)
    status, _ = await post_chat(base)
    assert status == 200 and app[LIMITER].backend_state == "redis"
    admin = aioredis.Redis(host="127.0.0.1", port=port, username=USER, password=PASSWORD,
                           ssl=True, ssl_ca_certs=str(ca), socket_timeout=2)
    async with admin:
        # The check ran there (its bucket, refilled within milliseconds, is gone already).
        assert (await admin.info("commandstats"))["cmdstat_evalsha"]["calls"] >= 1


@pytest.mark.parametrize("problem", ["an unknown CA", "a wrong password"])
async def test_an_unverified_server_or_a_wrong_password_is_refused_and_no_secret_is_logged(
        problem: str, tls_redis: tuple[int, Path], mock_upstream: Upstream,
        start_gateway: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    port, ca = tls_redis
    section = (redis_section(port) if problem == "an unknown CA" else
               {**redis_section(port, ca_file=str(ca)),
                "url": f"rediss://{USER}:wrong-{PASSWORD}@127.0.0.1:{port}/0"})
    app, base = await start_gateway(settings_for(mock_upstream.url, redis=section))
    status, body = await post_chat(base)
    assert status == 503 and app[LIMITER].backend_state == "unavailable"
    assert f"127.0.0.1:{port}" in caplog.text  # the outage is logged, naming the server
    assert PASSWORD not in caplog.text and PASSWORD not in body


async def test_a_cluster_over_tls_with_its_ca_file_and_an_acl_user_limits_through_redis(
        tls_cluster: tuple[LocalCluster, Path], mock_upstream: Upstream,
        start_gateway: Callable[..., Any]) -> None:
    cluster, ca = tls_cluster
    section = redis_section(cluster.nodes[0].port, mode="cluster", ca_file=str(ca))
    # A refill too slow to matter within the test: each bucket keeps its checks' marks.
    settings = settings_for(mock_upstream.url, redis=section,
                            limits={"requests_per_minute": 1, "burst": 100})
    app, base = await start_gateway(settings)
    for key in (KEY, KEY, OTHER_KEY):  # alice twice, bob once
        status, body = await post_chat(base, key)
        assert status == 200, body
    assert app[LIMITER].backend_state == "redis"

    def bucket_on_its_primary(name: str) -> tuple[int, float | None]:
        port = cluster.slot_owner(tag_slot(name))
        with cluster.node(port).client() as client:
            raw = client.hget(key_names(PREFIX, name)[0], "tokens")
        return port, None if raw is None else float(raw)

    (alice_on, alice), (bob_on, bob) = [await asyncio.to_thread(bucket_on_its_primary, name)
                                        for name in ("alice", "bob")]
    assert alice_on != bob_on  # two shards, each reached over TLS
    assert alice is not None and 97.5 < alice < 98.5
    assert bob is not None and 98.5 < bob < 99.5

"""Redis deployments of the test's own, on free loopback ports, for the fault tests of
``[redis] mode = "cluster"`` and ``"sentinel"`` (the machine's Redis on 6379 is never touched).

- ``LocalCluster``: six ``redis-server --cluster-enabled yes`` (3 primaries, 3 replicas) joined
  by ``redis-cli --cluster create --cluster-replicas 1``, with a short ``cluster-node-timeout``
  so that a killed primary's replica takes over within about two seconds.
- ``LocalSentinels``: a primary, its replica and three ``redis-sentinel`` processes watching
  them, with a short ``down-after-milliseconds``; the sentinels may require a password.

Nodes may speak only TLS, or want a user and password: ``connection`` (redis-py's keyword
arguments: ``ssl``, ``ssl_ca_certs``, ``username``, ``password``) says how to reach them.

Nothing is written to disk but the nodes' own files in the test's temporary folder; every
process starts through ``servers.spawn`` (it dies with the test run); every wait is bounded.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from servers import free_port, spawn, wait_until

NODE_TIMEOUT_MS = 1000
"""``cluster-node-timeout`` and sentinels' ``down-after-milliseconds``: how long a silent
primary stays a primary."""


def _redis(port: int, **connection: Any) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2,
                       **connection)


def _answers(port: int, connection: dict[str, Any]) -> bool:
    client = _redis(port, **connection)
    try:
        client.ping()
    except redis.AuthenticationError:
        pass  # NOAUTH: it answers (an AuthenticationError is a ConnectionError)
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    except redis.RedisError:
        pass
    finally:
        client.close()
    return True


class RedisNode:
    """One ``redis-server`` (or ``redis-sentinel``) process with its own folder; it may be
    killed and started again on the same port. With ``connection["ssl"]`` its port is a
    ``--tls-port`` (and it has no plain one); the TLS settings are in ``args``."""

    def __init__(self, folder: Path, args: list[str], binary: str = "redis-server",
                 config: str = "", connection: dict[str, Any] | None = None) -> None:
        self.port = free_port()
        self.folder = folder / str(self.port)
        self.folder.mkdir(parents=True)
        self.args = args
        self.binary = binary
        self.config = config
        self.connection = dict(connection or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False
        """Started once: a restart keeps its port (the cluster knows it by that)."""

    def start(self) -> RedisNode:
        """Start the process and wait until it answers. Ports are picked long before they are
        bound (every node's, then the cluster is made): on a busy host one may be taken
        meanwhile, so a first start that cannot bind moves to new free ports and tries again."""
        for attempt in range(3):
            if self._start_once():
                self.started = True
                return self
            if self.started or attempt == 2:
                break
            self._move_to_free_ports()
        raise AssertionError(f"{self.binary} on port {self.port} did not start: "
                             f"{(self.folder / 'log').read_text(errors='replace')[-2000:]}")

    def _start_once(self) -> bool:
        argv = [self.binary]
        if self.config:  # sentinels rewrite their file: it must be theirs and writable
            path = self.folder / "node.conf"
            if not path.exists():
                path.write_text(self.config)
            argv.append(str(path))
        ports = (["--port", "0", "--tls-port", str(self.port)] if self.connection.get("ssl")
                 else ["--port", str(self.port)])
        argv += [*ports, "--bind", "127.0.0.1", "--dir", str(self.folder), "--daemonize", "no"]
        if self.binary == "redis-server":
            # No disk, and a replica's first sync at once (not after diskless sync's 5 s wait).
            argv += ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
        argv += self.args
        with open(self.folder / "log", "ab") as log:
            proc = self.proc = spawn(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers(self.port, self.connection):
                return True
            time.sleep(0.05)
        self.kill()
        return False

    def _move_to_free_ports(self) -> None:
        self.port = free_port()
        if "--cluster-port" in self.args:
            self.args[self.args.index("--cluster-port") + 1] = str(free_port())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def client(self) -> redis.Redis:
        return _redis(self.port, **self.connection)


class LocalCluster:
    """3 primaries and 3 replicas on loopback (or ``replicas=0``: 3 primaries alone).

    ``args``: more for every node (TLS, ACL users); ``connection``: how to reach one (see
    ``RedisNode``); ``cli_args``: the same for ``redis-cli --cluster create``."""

    def __init__(self, folder: Path, replicas: int = 1, args: list[str] | None = None,
                 connection: dict[str, Any] | None = None,
                 cli_args: list[str] | None = None) -> None:
        self.replicas = replicas
        self.cli_args = list(cli_args or ())
        args = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--cluster-config-file", "nodes.conf",
                # A replica may take over however long it was cut off (a test kills at once).
                "--cluster-replica-validity-factor", "0",
                # The other shards serve while one has no primary; with the default
                # "yes" the whole cluster answers CLUSTERDOWN until a replica takes over.
                "--cluster-require-full-coverage", "no", *(args or ())]
        # The bus port is set apart: by default it is the port + 10000, past 65535 for a
        # free port above 55535.
        self.nodes = [RedisNode(folder, [*args, "--cluster-port", str(free_port())],
                                connection=connection)
                      for _ in range(3 * (1 + replicas))]

    @property
    def url(self) -> str:
        """One node is enough: the gateway discovers the others."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> LocalCluster:
        for node in self.nodes:
            node.start()
        subprocess.run(["redis-cli", *self.cli_args, "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        self.wait_healthy()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def alive(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.proc is not None]

    def slot_owner(self, slot: int) -> int:
        """The port of the primary that serves ``slot``, as the live nodes see it."""
        for node in self.alive():
            with suppress(redis.RedisError), node.client() as client:
                for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end:
                        return int(primary[1])
        raise AssertionError(f"no primary serves slot {slot}")

    def primary_ports(self) -> set[int]:
        ports: set[int] = set()
        for node in self.alive():
            with suppress(redis.RedisError), node.client() as client:
                if client.info("replication")["role"] == "master":
                    ports.add(node.port)
        return ports

    def kill_shard(self, primary: int) -> None:
        """Kill the primary on port ``primary`` and its replicas: its slots stay unserved."""
        for node in self.alive():
            with suppress(redis.RedisError), node.client() as client:
                info = client.info("replication")
            if node.port == primary or (info.get("role") == "slave"
                                        and int(info.get("master_port", 0)) == primary):
                node.kill()

    def node(self, port: int) -> RedisNode:
        return next(n for n in self.nodes if n.port == port)

    def node_id(self, port: int) -> str:
        with self.node(port).client() as client:
            return str(client.execute_command("CLUSTER MYID").decode())

    def healthy(self) -> bool:
        """Every live node says ``cluster_state:ok`` and all slots are served by live nodes."""
        live = {n.port for n in self.alive()}
        try:
            for port in live:
                with self.node(port).client() as client:
                    if client.cluster("info")["cluster_state"] != "ok":
                        return False
            return all(self.slot_owner(slot) in live for slot in (0, 5461, 10923, 16383))
        except (redis.RedisError, AssertionError):
            return False

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_until(self.healthy, timeout, "the cluster to be healthy", 0.1)

    def reshard(self, source: int, target: int, slots: int) -> subprocess.Popen[bytes]:
        """``redis-cli --cluster reshard``: move ``slots`` slots (the lowest first) from the
        primary on port ``source`` to the one on ``target``, in the background."""
        return spawn(["redis-cli", "--cluster", "reshard", f"127.0.0.1:{source}",
                      "--cluster-from", self.node_id(source), "--cluster-to",
                      self.node_id(target), "--cluster-slots", str(slots), "--cluster-yes",
                      "--cluster-pipeline", "10"],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def tag_slot(tag: str) -> int:
    """The cluster slot of every key whose hash tag is ``tag``."""
    return key_slot(tag.encode())


def name_on_slot(slot: int, stem: str) -> str:
    """A key name (``<stem>-<n>``) whose hash tag is on cluster slot ``slot``."""
    return next(n for n in (f"{stem}-{i}" for i in range(1_000_000)) if tag_slot(n) == slot)


async def on_node(port: int, *command: Any) -> Any:
    """One command to one node, as an operator's redis-cli would send it (without blocking
    the test's event loop)."""
    async with aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as node:
        return await node.execute_command(*command)


@contextmanager
def local_cluster(folder: Path, **options: Any) -> Iterator[LocalCluster]:
    cluster = LocalCluster(folder, **options)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


SENTINEL_CONFIG = """\
sentinel monitor {service} 127.0.0.1 {primary} 2
sentinel down-after-milliseconds {service} {timeout}
sentinel failover-timeout {service} 10000
sentinel parallel-syncs {service} 1
{requirepass}"""


class LocalSentinels:
    """A primary and its replica, watched by three sentinels (which, given a
    ``sentinel_password``, require it of every client and of each other)."""

    SERVICE = "gwprimary"

    def __init__(self, folder: Path, data_args: list[str] | None = None,
                 sentinel_password: str = "") -> None:
        self.sentinel_password = sentinel_password
        self.primary = RedisNode(folder, list(data_args or ()))
        self.replica = RedisNode(folder, list(data_args or ()))
        # Their config names the primary's port: written once the primary runs (see start).
        self.sentinels = [RedisNode(folder, [], binary="redis-sentinel",
                                    connection={"password": sentinel_password or None})
                          for _ in range(3)]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def start(self) -> LocalSentinels:
        self.primary.start()
        self.replica.args += ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start()
        config = SENTINEL_CONFIG.format(service=self.SERVICE, primary=self.primary.port,
                                        timeout=NODE_TIMEOUT_MS,
                                        requirepass=(f"requirepass {self.sentinel_password}\n"
                                                     if self.sentinel_password else ""))
        for sentinel in self.sentinels:
            sentinel.config = config
            sentinel.start()
        # SENTINEL FAILOVER needs no quorum: a replica seen in sync is enough.
        wait_until(self.replica_ready, 30, "the sentinels to see the replica in sync", 0.1)
        return self

    def replica_ready(self) -> bool:
        """The first sentinel sees the replica up and its link to the primary up."""
        with self.sentinels[0].client() as client:
            replicas = client.sentinel_slaves(self.SERVICE)
        return any(r.get("is_slave") and not r.get("is_sdown")
                   and r.get("master-link-status") == "ok" for r in replicas)

    def primary_port(self) -> int:
        """The primary's port, as the first sentinel names it."""
        with self.sentinels[0].client() as client:
            _, port = client.sentinel_get_master_addr_by_name(self.SERVICE)
        return int(port)

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: the sentinels promote the replica at once."""
        with self.sentinels[0].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", self.SERVICE)

    def stop(self) -> None:
        for node in (*self.sentinels, self.replica, self.primary):
            node.kill()


@contextmanager
def local_sentinels(folder: Path, data_args: list[str] | None = None,
                    sentinel_password: str = "") -> Iterator[LocalSentinels]:
    sentinels = LocalSentinels(folder, data_args, sentinel_password)
    try:
        yield sentinels.start()
    finally:
        sentinels.stop()

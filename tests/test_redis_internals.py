"""Pins each part of redis-py (and hiredis) that the gateway relies on beyond their documented
API, against the real Redis on 127.0.0.1:6379, so that a release that changes one fails here
first. ``scripts/test`` runs this file on the floor of ``setup.cfg``'s redis range as well as on
the installed version: the range is the one these tests pass on.

The numbered lists followed here, one test (or more) per item:

- ``gateway/redis/pipe.py``: a connection held at the transport level, the reply reader (1-7);
- ``gateway/redis/batcher.py``: a cluster's nodes, its slot map and pipeline (1-4);
- ``gateway/redis/topology.py``: the sentinel pool (1-3);
- ``gateway/ratelimit/scripts.py``: a registered script's ``sha`` and ``script``.

Where only a cluster or sentinels show the behaviour, what can be pinned without one is (the
attribute, the signature, a cluster node's calls against a plain Redis), and the test that
exercises the rest is named. Each test cleans up after itself: keys under its own prefix (the
``redis_url`` fixture removes them), its connections closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable

import hiredis
import pytest
import redis.asyncio as aioredis
from redis._parsers import BaseParser
from redis.asyncio.cluster import (
    ClusterNode,
    ClusterPipeline,
    NodesManager,
    PipelineCommand,
    RedisCluster,
)
from redis.asyncio.connection import AbstractConnection, Connection, ConnectionPool, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    InvalidResponse,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


async def until(condition: Callable[[], bool | Awaitable[bool]], seconds: float = 2.0) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        done = condition()
        if done if isinstance(done, bool) else await done:
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.005)


def command(*args: str) -> bytes:
    """One command in RESP, written by hand: these tests lean on nothing of the gateway's."""
    out = b"*%d\r\n" % len(args)
    for arg in args:
        out += b"$%d\r\n%b\r\n" % (len(arg.encode()), arg.encode())
    return out


@pytest.fixture
async def connection(redis_url: str) -> AsyncIterator[Connection]:
    """A connection of redis-py's own, connected (its handshake done), as a pool lends it."""
    connection = Connection(**parse_url(redis_url), socket_timeout=5)
    await connection.connect()
    try:
        yield connection
    finally:
        await connection.disconnect()


async def client_id(connection: Connection) -> int:
    await connection.send_command("CLIENT", "ID")
    return int(await connection.read_response())


async def kill(redis_url: str, connection_id: int) -> None:
    admin = aioredis.from_url(redis_url)
    try:
        await admin.client_kill_filter(_id=str(connection_id))
    finally:
        await admin.aclose()


class Replies(asyncio.Protocol):
    """A protocol of the test's own, put on redis-py's transport as the pipe puts ``_Replies``:
    it keeps what it reads and passes the connection's end on to redis-py's protocol."""

    def __init__(self, theirs: asyncio.BaseProtocol) -> None:
        self.theirs = theirs
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)
        self.theirs.connection_lost(exc)


# gateway/redis/pipe.py, item 1: the transport's protocol swapped out and back, on asyncio's
# loop and on uvloop's, which the gateway serves on (``gateway/server/workers.py``).

async def connected(redis_url: str) -> Connection:
    connection = Connection(**parse_url(redis_url), socket_timeout=5)
    await connection.connect()
    return connection


async def swapped_out_and_back(redis_url: str) -> None:
    connection = await connected(redis_url)
    try:
        writer = connection._writer
        assert isinstance(writer, asyncio.StreamWriter)
        transport = writer.transport
        theirs = transport.get_protocol()
        ours = Replies(theirs)
        transport.set_protocol(ours)
        assert transport.get_protocol() is ours
        transport.write(command("PING"))
        assert await until(lambda: bytes(ours.data) == b"+PONG\r\n"), bytes(ours.data)
        transport.set_protocol(theirs)
        await connection.send_command("ECHO", "back")
        assert await asyncio.wait_for(connection.read_response(), 2) == b"back"
    finally:
        await connection.disconnect()


async def ended_while_swapped_out(redis_url: str) -> None:
    """Without the end passed on, redis-py's next read on a connection that ended while it was
    swapped out would wait for its ``socket_timeout`` instead of failing at once."""
    connection = await connected(redis_url)
    try:
        connection_id = await client_id(connection)
        transport = connection._writer.transport  # type: ignore[union-attr]
        theirs = transport.get_protocol()
        ours = Replies(theirs)
        transport.set_protocol(ours)
        await kill(redis_url, connection_id)
        await asyncio.wait_for(ours.lost, 2)
        transport.set_protocol(theirs)
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(connection.read_response(), 2)  # well within its 5 s
    finally:
        await connection.disconnect()


async def test_a_connections_transport_takes_another_protocol_and_redis_py_reads_on_once_back(
        redis_url: str) -> None:
    await swapped_out_and_back(redis_url)


async def test_a_connection_lost_passed_on_to_redis_pys_protocol_tells_redis_py_it_ended(
        redis_url: str) -> None:
    await ended_while_swapped_out(redis_url)


def test_on_uvloop_too_the_protocol_swaps_out_and_back_and_passes_the_end_on(
        redis_url: str) -> None:
    uvloop = pytest.importorskip("uvloop")  # not on Windows (setup.cfg)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(swapped_out_and_back(redis_url))
        runner.run(ended_while_swapped_out(redis_url))


# gateway/redis/pipe.py, item 2: error replies become redis-py's exceptions.

@pytest.mark.parametrize(("reply", "error_class"), [
    ("MOVED 3999 127.0.0.1:6381", MovedError),
    ("ASK 3999 127.0.0.1:6381", AskError),
    ("TRYAGAIN Multiple keys request during rehashing of slot", TryAgainError),
    ("NOSCRIPT No matching script. Please use EVAL.", NoScriptError),
    ("LOADING Redis is loading the dataset in memory", BusyLoadingError),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", ResponseError),
    ("ERR unknown command 'NO-SUCH-COMMAND'", ResponseError),
])
def test_parse_error_returns_the_exception_class_the_pipe_tells_each_error_reply_by(
        reply: str, error_class: type[Exception]) -> None:
    error = BaseParser.parse_error(reply)
    assert type(error) is error_class, (reply, type(error))


def test_a_redirect_names_its_node_and_slot_and_moved_is_a_kind_of_ask() -> None:
    moved = BaseParser.parse_error("MOVED 3999 127.0.0.1:6381")
    assert isinstance(moved, MovedError) and isinstance(moved, AskError)
    assert (moved.host, moved.port, moved.slot_id) == ("127.0.0.1", 6381, 3999)
    ask = BaseParser.parse_error("ASK 12182 10.0.0.7:7002")
    assert (ask.host, ask.port, ask.slot_id) == ("10.0.0.7", 7002, 12182)


def test_loading_is_a_connection_error_and_the_others_are_not() -> None:
    """The pipe ends its connection on an error reply that is a connection error (LOADING:
    ready for none of the commands in flight) and hands any other to its caller."""
    assert isinstance(BaseParser.parse_error("LOADING Redis is loading"), RedisConnectionError)
    for reply in ("NOSCRIPT x", "TRYAGAIN x", "MOVED 1 h:1", "ERR x"):
        assert not isinstance(BaseParser.parse_error(reply), RedisConnectionError), reply


# gateway/redis/pipe.py, item 3: the connection's encoder.

def test_a_connections_encoder_says_how_redis_py_decodes_its_replies() -> None:
    plain = Connection().encoder
    assert (plain.encoding, plain.encoding_errors, plain.decode_responses) == \
        ("utf-8", "strict", False)
    decoding = Connection(encoding="latin-1", encoding_errors="replace",
                          decode_responses=True).encoder
    assert (decoding.encoding, decoding.encoding_errors, decoding.decode_responses) == \
        ("latin-1", "replace", True)


# gateway/redis/pipe.py, item 4: socket_timeout, read at each read.

async def test_socket_timeout_is_read_at_each_read_so_it_can_be_taken_off_and_put_back(
        redis_url: str, redis_prefix: str) -> None:
    connection = Connection(**parse_url(redis_url), socket_timeout=0.2)
    await connection.connect()
    try:
        connection.socket_timeout = None  # off: a reply slower than 0.2 s is waited for
        await connection.send_command("BLPOP", f"{redis_prefix}:empty", "0.5")
        assert await asyncio.wait_for(connection.read_response(), 3) is None
        connection.socket_timeout = 0.2  # put back: redis-py's next read times out by it
        await connection.send_command("BLPOP", f"{redis_prefix}:empty", "3")
        with pytest.raises(RedisTimeoutError):
            await asyncio.wait_for(connection.read_response(), 2)
    finally:
        await connection.disconnect()


# gateway/redis/pipe.py, item 5: can_read() on a clean, a dirty and a closed connection.

async def test_can_read_is_false_on_a_clean_connection_and_true_while_a_reply_waits_unread(
        connection: Connection) -> None:
    assert await connection.can_read() is False
    await connection.send_command("PING")
    assert await until(connection.can_read), "a reply waits, yet can_read() said False"
    assert await connection.read_response() == b"PONG"
    assert await connection.can_read() is False


async def test_can_read_never_says_false_for_a_connection_redis_closed_and_it_reconnects(
        connection: Connection, redis_url: str) -> None:
    """The pipe's check before it writes on a lent connection (``_ready``): True, or redis-py's
    ``ConnectionError`` (8.2), for a connection Redis closed; then disconnect and connect."""

    async def says_closed() -> bool:
        try:
            return await connection.can_read()
        except RedisConnectionError:
            return True

    old_id = await client_id(connection)
    await kill(redis_url, old_id)
    assert await until(says_closed), "can_read() kept saying False for a closed connection"
    await connection.disconnect()
    await connection.connect()
    assert connection.is_connected and await client_id(connection) != old_id


# gateway/redis/pipe.py, item 6 (and topology.py, item 2): marked for reconnect while lent.

async def test_a_lent_connection_marked_for_reconnect_says_so_and_its_pool_closes_it_on_release(
        redis_url: str) -> None:
    pool = ConnectionPool.from_url(redis_url)
    try:
        connection = await pool.get_connection()
        assert connection.is_connected and not connection.should_reconnect()
        await pool.update_active_connections_for_reconnect()
        assert connection.should_reconnect()
        await pool.release(connection)
        assert not connection.is_connected
        again = await pool.get_connection()  # connected anew, to wherever the pool says now
        assert again.is_connected and not again.should_reconnect()
        await pool.release(again)
    finally:
        await pool.disconnect()


# gateway/redis/pipe.py, item 7: hiredis' Reader, set up as redis-py sets up its own.

async def test_a_reader_set_up_as_redis_pys_returns_its_errors_for_real_error_replies(
        redis_url: str) -> None:
    url = parse_url(redis_url)
    reader, writer = await asyncio.open_connection(url["host"], url["port"])
    try:
        writer.write(command("EVALSHA", "0" * 40, "0") + command("NO-SUCH-COMMAND")
                     + command("PING"))
        data = await asyncio.wait_for(reader.readuntil(b"+PONG\r\n"), 2)
    finally:
        writer.close()
    not_enough: object = object()
    parser = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error,
                            notEnoughData=not_enough)
    parser.feed(data[:5])
    assert parser.gets() is not_enough  # until a whole reply is in
    parser.feed(data[5:])
    replies = [parser.gets() for _ in range(3)]
    assert [type(reply) for reply in replies] == [NoScriptError, ResponseError, bytes], replies
    assert parser.gets() is not_enough


async def test_a_resp3_push_message_comes_out_as_a_push_notification(
        redis_url: str, redis_prefix: str) -> None:
    url = parse_url(redis_url)
    key = f"{redis_prefix}:tracked"
    reader, writer = await asyncio.open_connection(url["host"], url["port"])
    parser = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)
    try:
        writer.write(command("HELLO", "3") + command("CLIENT", "TRACKING", "ON")
                     + command("GET", key) + command("SET", key, "1"))
        replies: list[object] = []
        while not any(isinstance(reply, hiredis.PushNotification) for reply in replies):
            parser.feed(await asyncio.wait_for(reader.read(65536), 2))
            while (reply := parser.gets()) is not False:
                replies.append(reply)
    finally:
        writer.close()
    push = next(reply for reply in replies if isinstance(reply, hiredis.PushNotification))
    assert isinstance(push, list) and push[0] == b"invalidate", push


# gateway/redis/batcher.py, item 1: a cluster node's connections, lent and taken back.
# (A ClusterNode is one node's connections: a plain Redis serves it as well as a cluster's.)

def node_for(redis_url: str) -> ClusterNode:
    url = parse_url(redis_url)
    return ClusterNode(url["host"], url["port"], "primary")


async def test_a_cluster_node_lends_a_connection_and_takes_it_back_without_an_await(
        redis_url: str) -> None:
    assert not inspect.iscoroutinefunction(ClusterNode.acquire_connection)
    assert not inspect.iscoroutinefunction(ClusterNode.release)
    node = node_for(redis_url)
    try:
        lent = node.acquire_connection()
        assert isinstance(lent, AbstractConnection)
        await lent.connect()  # the pipe connects what it is lent (pipe.py, item 5)
        node.release(lent)
        assert node.acquire_connection() is lent  # the next borrower gets it back
        node.release(lent)
    finally:
        await node.disconnect()


# gateway/redis/batcher.py, item 2: ASKING and its command on one connection.

async def test_execute_pipeline_keeps_its_commands_on_one_connection_and_each_reply_in_its_command(
        redis_url: str) -> None:
    """The ASK redirects themselves: ``tests/guarantees/test_redis_cluster.py::
    test_a_slot_stuck_migrating_keeps_its_keys_exact_through_ask_and_opens_no_breaker``."""
    node = node_for(redis_url)
    try:
        first, second = node.acquire_connection(), node.acquire_connection()
        node.release(first)
        node.release(second)  # two free connections: the pipeline still keeps to one
        commands = [PipelineCommand(0, "CLIENT", "ID"), PipelineCommand(1, "NO-SUCH-COMMAND"),
                    PipelineCommand(2, "CLIENT", "ID")]
        await node.execute_pipeline(commands)  # an error reply is kept, not raised
        assert isinstance(commands[1].result, ResponseError)
        assert isinstance(commands[0].result, int) and commands[0].result == commands[2].result
    finally:
        await node.disconnect()


# gateway/redis/batcher.py, items 3 and 4: what only a cluster shows.

async def test_a_cluster_clients_slot_map_moves_a_slot_with_a_coroutine_given_the_redirect(
        ) -> None:
    """Exercised by ``tests/guarantees/test_redis_cluster.py::
    test_a_slot_migration_under_load_fails_no_check_and_keeps_limits_exact``."""
    assert inspect.iscoroutinefunction(NodesManager.move_slot)
    positional = [p for p in inspect.signature(NodesManager.move_slot).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) == 2  # self, the MovedError
    client = RedisCluster(host="127.0.0.1", port=6379)  # nothing is sent until it is used
    try:
        assert isinstance(client.nodes_manager, NodesManager)
    finally:
        await client.aclose()


async def test_a_cluster_pipeline_can_leave_redirects_in_its_replies() -> None:
    """Exercised by ``tests/guarantees/test_redis_cluster.py::
    test_a_slot_stuck_migrating_keeps_its_keys_exact_through_ask_and_opens_no_breaker``."""
    parameters = inspect.signature(ClusterPipeline.execute).parameters
    assert {"raise_on_error", "allow_redirections"} <= set(parameters)
    client = RedisCluster(host="127.0.0.1", port=6379)
    try:
        assert isinstance(client.pipeline(transaction=False), ClusterPipeline)
    finally:
        await client.aclose()


# gateway/redis/topology.py, items 1 and 3: the sentinel pool (item 2: the pool test above).

async def test_a_sentinel_pool_asks_for_the_primary_with_a_coroutine_and_keeps_its_sentinels(
        ) -> None:
    """Exercised by ``tests/guarantees/test_redis_sentinel.py::
    test_sentinel_failover_the_gateway_finds_the_new_primary``."""
    assert inspect.iscoroutinefunction(SentinelConnectionPool.get_master_address)
    assert issubclass(SentinelConnectionPool, ConnectionPool)  # so item 2 holds for it too
    sentinel = Sentinel([("127.0.0.1", 1), ("127.0.0.1", 2)])  # nothing is sent
    client = sentinel.master_for("gateway-internals-test")
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert all(isinstance(s, aioredis.Redis) for s in pool.sentinel_manager.sentinels)
        assert len(pool.sentinel_manager.sentinels) == 2
    finally:
        await client.aclose()
        for each in sentinel.sentinels:
            await each.aclose()


# gateway/ratelimit/scripts.py: a registered script's SHA, what Redis answers, and settable.

async def test_a_registered_scripts_sha_is_the_one_script_load_answers_and_may_be_set(
        redis_url: str) -> None:
    """One tiny script stays in the shared Redis' script cache: flushing it is not this test's
    to do (other tests' scripts live there too)."""
    source = "return 'gateway internals test'"
    client = aioredis.from_url(redis_url)
    cluster = RedisCluster(host="127.0.0.1", port=6379)  # the cluster client's scripts too
    try:
        for script in (client.register_script(source), cluster.register_script(source)):
            assert script.script == source
            assert script.sha == hashlib.sha1(source.encode()).hexdigest()
        script = client.register_script(source)
        loaded = await client.script_load(source)
        assert script.sha == (loaded.decode() if isinstance(loaded, bytes) else loaded)
        script.sha = "0" * 40  # after a reload the limiter sets what Redis gave
        assert script.sha == "0" * 40
    finally:
        await client.aclose()
        await cluster.aclose()

"""Continuous pipelining (``gateway/redis/pipe.py``), through a real Redis and a loopback proxy
that can hold Redis' replies back: a command goes out while the replies of the commands before
it are still on their way, each caller gets its own reply in order, and a late reply fails
what is in flight without leaving the next command stuck behind it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.redis.batcher import RedisBatcher
from gateway.redis.commands import pack
from gateway.redis.pipe import RedisPipe
from gateway.redis.topology import RedisClient, connect
from gateway.settings import RedisSettings

from servers import Blackhole


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[Blackhole]:
    proxy = Blackhole(redis_url)
    await proxy.start()
    try:
        yield proxy
    finally:
        proxy.replies.set()
        await proxy.close()


OpenBatcher = Callable[[float], tuple[RedisClient, RedisBatcher]]


@pytest.fixture
async def open_batcher(proxy: Blackhole, redis_prefix: str) -> AsyncIterator[OpenBatcher]:
    """A client and its batcher through ``proxy``, replies due within ``timeout_seconds``;
    closed after the test (the ``redis_url`` fixture removes the test's keys)."""
    assert proxy.server is not None
    url = f"redis://127.0.0.1:{proxy.server.sockets[0].getsockname()[1]}/0"
    opened: list[tuple[RedisClient, RedisBatcher]] = []

    def open_(timeout_seconds: float) -> tuple[RedisClient, RedisBatcher]:
        client = connect(RedisSettings(url=url, key_prefix=redis_prefix,
                                       timeout_seconds=timeout_seconds))
        opened.append((client, RedisBatcher(client)))
        return opened[-1]

    yield open_
    proxy.replies.set()
    proxy.silent = False
    for client, batch in opened:
        await batch.close()
        await client.aclose()


async def until(condition: object, seconds: float = 2.0) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def test_a_command_goes_out_while_the_replies_before_it_are_still_on_their_way(
        proxy: Blackhole, open_batcher: OpenBatcher, redis_prefix: str) -> None:
    _, batch = open_batcher(5)
    key = f"{redis_prefix}:pipe"
    assert await batch.execute("SET", key, "0") == b"OK"  # connected, nothing held
    proxy.replies.clear()
    first = asyncio.ensure_future(batch.execute("INCR", key))
    assert await until(lambda: proxy.seen.count(b"INCR") == 1)
    second = asyncio.ensure_future(batch.execute("INCRBY", key, "10"))
    # The first reply is held at the proxy, yet the second command reaches Redis.
    assert await until(lambda: b"INCRBY" in proxy.seen), "it waited for the first reply"
    assert not first.done() and not second.done()
    proxy.replies.set()
    assert await asyncio.wait_for(asyncio.gather(first, second), 2) == [1, 11]


async def held_batches(batch: RedisBatcher, proxy: Blackhole, commands: list[tuple[str, ...]],
                       wait: float) -> list[asyncio.Future[object]]:
    """With Redis' replies held at the proxy, each command in a batch of its own: each is
    waited for at the proxy (up to ``wait`` seconds) before the next is sent."""
    proxy.replies.clear()
    calls: list[asyncio.Future[object]] = []
    for command in commands:
        calls.append(asyncio.ensure_future(batch.execute(*command)))
        await until(lambda name=command[0].encode(): proxy.seen.count(name) == len(calls),
                    wait)
    return calls


async def test_a_third_batch_waits_for_the_first_batchs_replies(
        proxy: Blackhole, open_batcher: OpenBatcher, redis_prefix: str) -> None:
    """Two batches in flight at most: more writes for fewer commands would cost CPU."""
    _, batch = open_batcher(5)
    key = f"{redis_prefix}:depth"
    assert await batch.execute("SET", key, "0") == b"OK"
    calls = await held_batches(batch, proxy, [("INCRBY", key, str(n)) for n in (1, 10, 100)],
                               0.3)
    assert proxy.seen.count(b"INCRBY") == 2  # the third waits
    proxy.replies.set()
    assert await asyncio.wait_for(asyncio.gather(*calls), 2) == [1, 11, 111]


async def test_a_late_reply_fails_what_is_in_flight_and_the_next_command_is_answered(
        proxy: Blackhole, open_batcher: OpenBatcher, redis_prefix: str) -> None:
    _, batch = open_batcher(0.3)
    key = f"{redis_prefix}:late"
    assert await batch.execute("SET", key, "0") == b"OK"
    proxy.replies.clear()
    stuck = [asyncio.ensure_future(batch.execute("INCR", key)) for _ in range(3)]
    await asyncio.sleep(0.1)
    stuck.append(asyncio.ensure_future(batch.execute("INCR", key)))  # a later batch
    results = await asyncio.wait_for(asyncio.gather(*stuck, return_exceptions=True), 2)
    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    proxy.replies.set()  # the held replies now reach a connection that is gone
    # A new connection; the four INCRs ran in Redis (their replies were lost).
    assert await asyncio.wait_for(batch.execute("INCR", key), 2) == 5


async def test_each_batch_has_its_own_deadline_while_the_reader_stays_busy(
        proxy: Blackhole, open_batcher: OpenBatcher, redis_prefix: str) -> None:
    """A reply is due within the timeout of its own batch's write, not of the first batch the
    reader met: under steady load the reader never goes idle, and a reply that comes after
    the first batch's deadline but within its own is an answer, not a timeout."""
    _, batch = open_batcher(1.0)
    key = f"{redis_prefix}:deadline"
    assert await batch.execute("SET", key, "0") == b"OK"
    proxy.replies.clear()
    first = asyncio.ensure_future(batch.execute("INCR", key))  # due by 1.0 s
    assert await until(lambda: proxy.seen.count(b"INCR") == 1)
    await asyncio.sleep(0.5)
    second = asyncio.ensure_future(batch.execute("INCRBY", key, "10"))  # due by about 1.5 s
    assert await until(lambda: b"INCRBY" in proxy.seen)
    await asyncio.sleep(0.1)
    proxy.replies.set()  # lets the first reply through, which the proxy already holds...
    proxy.replies.clear()  # ...and holds the second
    assert await asyncio.wait_for(first, 1) == 1
    await asyncio.sleep(0.6)  # past the first batch's deadline, within the second's
    assert not second.done()
    proxy.replies.set()
    assert await asyncio.wait_for(second, 1) == 11


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    commands = [("EVALSHA", "e" * 40, 2, "gw:{k\u00e9y}:bucket", "gw:{k\u00e9y}:streams",
                 repr(1e9 / 60.0), 10, 1, -1, 10_000, "a1b2:7"),
                ("ZREM", "gw:{k}:streams", b"\x00\r\nraw", ""), ("HGET", "gw:keys", "0" * 64)]
    batch = [(c, None) for c in commands]  # no caller: packing never looks at the future
    assert pack(batch) == b"".join(Connection().pack_commands(commands))  # type: ignore[arg-type]


async def test_closing_with_a_batch_waiting_for_its_turn_answers_every_caller(
        proxy: Blackhole, open_batcher: OpenBatcher, redis_prefix: str) -> None:
    """The batcher has taken the waiting batch off its queue: closing must still reach it."""
    _, batch = open_batcher(5)
    key = f"{redis_prefix}:closing"
    assert await batch.execute("SET", key, "0") == b"OK"
    # Two batches in flight, the third waits for a slot.
    calls = await held_batches(batch, proxy, [("INCR", key)] * 3, 0.3)
    await batch.close()
    await asyncio.wait_for(asyncio.wait(calls), 2)
    assert all(call.cancelled() for call in calls)


async def test_a_batch_waiting_for_its_turn_goes_on_when_the_batches_before_it_fail(
        proxy: Blackhole, open_batcher: OpenBatcher, redis_prefix: str) -> None:
    _, batch = open_batcher(0.3)
    key = f"{redis_prefix}:turn"
    assert await batch.execute("SET", key, "0") == b"OK"
    calls = await held_batches(batch, proxy, [("INCR", key)] * 3, 0.1)  # the third waits
    first_two = await asyncio.wait_for(asyncio.gather(*calls[:2], return_exceptions=True), 2)
    assert all(isinstance(r, RedisTimeoutError) for r in first_two), first_two
    proxy.replies.set()
    # The third goes out on a new connection and is answered (the two INCRs ran).
    assert await asyncio.wait_for(calls[2], 2) == 3


async def test_a_connection_given_back_keeps_its_timeout_for_the_pools_other_users(
        proxy: Blackhole, open_batcher: OpenBatcher, redis_prefix: str) -> None:
    """The pipe turns the connection's per-read timeout off while it holds it; the pool's
    other users (readiness pings, the breaker's probe) must find it on again."""
    client, batch = open_batcher(0.2)
    assert await batch.execute("EXISTS", f"{redis_prefix}:nothing") == 0
    await batch.close()  # its connection back in the pool, the only one there
    proxy.silent = True
    with pytest.raises(RedisTimeoutError):
        await asyncio.wait_for(client.ping(), 2)  # redis-py's own timeout, not ours


async def test_a_connection_redis_closes_fails_what_is_in_flight_and_the_next_command_reconnects(
        open_batcher: OpenBatcher, redis_url: str, redis_prefix: str) -> None:
    """The pipe reads replies with a protocol of its own while it holds the connection: the
    connection's end must still reach the callers in flight (an error, at once, not a
    timeout) and redis-py, whose pool then gives the next batch a new connection."""
    _, batch = open_batcher(5)
    key = f"{redis_prefix}:killed"
    assert await batch.execute("SET", key, "0") == b"OK"
    blocked = asyncio.ensure_future(batch.execute("BLPOP", f"{key}:list", "0"))  # no reply
    admin = aioredis.from_url(redis_url)
    try:
        ours: list[str] = []

        async def find() -> bool:
            ours[:] = [c["id"] for c in await admin.client_list()
                       if c["name"] == "gateway" and c["cmd"] == "blpop"]
            return len(ours) == 1

        deadline = asyncio.get_running_loop().time() + 2
        while not await find():
            assert asyncio.get_running_loop().time() < deadline, "BLPOP never reached Redis"
            await asyncio.sleep(0.01)
        await admin.client_kill_filter(_id=ours[0])
    finally:
        await admin.aclose()
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(blocked, 2)  # well within the 5 s timeout
    assert await asyncio.wait_for(batch.execute("INCR", key), 2) == 1


async def test_a_servers_push_message_is_no_commands_reply(
        open_batcher: OpenBatcher, redis_prefix: str) -> None:
    """redis-py speaks RESP3, in which Redis may send messages nobody asked for (an
    invalidation for a tracked key, a cluster's maintenance notice). Each caller must still
    get its own reply, and the connection must live on."""
    _, batch = open_batcher(5)
    key, other = f"{redis_prefix}:tracked", f"{redis_prefix}:counter"
    assert await batch.execute("SET", key, "1") == b"OK"
    connection_id = await batch.execute("CLIENT", "ID")
    assert await batch.execute("CLIENT", "TRACKING", "ON") == b"OK"
    assert await batch.execute("GET", key) == b"1"  # now tracked: a change is pushed to us
    replies = await asyncio.wait_for(asyncio.gather(
        batch.execute("SET", key, "2"), batch.execute("INCR", other),
        batch.execute("GET", key)), 2)
    assert replies == [b"OK", 1, b"2"]
    assert await asyncio.wait_for(batch.execute("CLIENT", "ID"), 2) == connection_id


class OneConnection:
    """A pool that hands out its one connection unchecked, as a cluster node does."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def get_connection(self) -> Connection:
        return self.connection

    async def release(self, connection: AbstractConnection) -> None:
        pass


async def test_a_pooled_connection_redis_closed_is_replaced_not_waited_on(
        redis_url: str) -> None:
    """A cluster node's pool hands its connections out without redis-py's check: one that Redis
    closed while it sat there (its idle timeout, a restart) must be reconnected, not written to
    until the reply's deadline (the pipe's protocol never hears of an end that came before)."""
    connection = Connection(**parse_url(redis_url), socket_timeout=5)
    await connection.connect()
    await connection.send_command("CLIENT", "ID")
    connection_id = await connection.read_response()
    admin = aioredis.from_url(redis_url)
    try:
        await admin.client_kill_filter(_id=connection_id)
    finally:
        await admin.aclose()
    await asyncio.sleep(0.05)  # its end reaches redis-py's protocol
    pipe = RedisPipe(OneConnection(connection))
    ping: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    try:
        await pipe.send([(("PING",), ping)])
        assert await asyncio.wait_for(ping, 1) == b"PONG"
    finally:
        await pipe.close()
        await connection.disconnect()

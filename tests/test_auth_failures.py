"""``AuthFailureThrottle``: a token bucket of failures per client address, with bounded memory.
Its effect on a served gateway (429 without a Redis lookup, known keys untouched) is proved in
``tests/guarantees/test_hostile_requests.py``; here, its arithmetic, on a clock the test sets."""

from __future__ import annotations

import pytest

from gateway.auth import AuthFailureThrottle


def test_a_client_may_fail_per_minute_times_in_a_row_then_once_per_refill() -> None:
    throttle = AuthFailureThrottle(per_minute=6)  # one token per 10 s
    for _ in range(6):
        assert throttle.wait("192.0.2.1", now=100.0) == 0
        throttle.failed("192.0.2.1", now=100.0)
    assert throttle.wait("192.0.2.1", now=100.0) == pytest.approx(10.0)
    assert throttle.wait("192.0.2.1", now=104.0) == pytest.approx(6.0)
    assert throttle.wait("192.0.2.1", now=110.0) == 0
    assert throttle.wait("192.0.2.2", now=100.0) == 0  # another client, its own bucket


def test_ipv6_clients_count_per_64_and_ipv4_mapped_ones_as_ipv4() -> None:
    throttle = AuthFailureThrottle(per_minute=1)
    throttle.failed("2001:db8:1:2::1", now=0.0)
    assert throttle.wait("2001:db8:1:2:ffff::9", now=0.0) > 0  # same /64
    assert throttle.wait("2001:db8:1:3::1", now=0.0) == 0  # next /64
    throttle.failed("::ffff:192.0.2.7", now=0.0)
    assert throttle.wait("192.0.2.7", now=0.0) > 0


def test_memory_stays_bounded_and_refilled_buckets_go_first() -> None:
    throttle = AuthFailureThrottle(per_minute=60, max_clients=100)  # refills 1 a second
    for i in range(99):
        throttle.failed(f"198.51.100.{i}", now=0.0)  # one failure each: refilled by t=1
    for _ in range(60):
        throttle.failed("203.0.113.1", now=5.0)  # out of allowance at t=5
    throttle.failed("192.0.2.1", now=5.0)  # the table is full: the refilled ones go
    assert len(throttle) == 2
    assert throttle.wait("203.0.113.1", now=5.0) > 0
    for i in range(10_000):  # a table full of fresh failures: the oldest go, 10% at a time
        throttle.failed(f"10.0.{i >> 8}.{i & 255}", now=6.0)
        assert len(throttle) <= 100


def test_zero_per_minute_turns_the_throttle_off() -> None:
    throttle = AuthFailureThrottle(per_minute=0)
    for _ in range(1000):
        throttle.failed("192.0.2.1")
    assert throttle.wait("192.0.2.1") == 0 and len(throttle) == 0

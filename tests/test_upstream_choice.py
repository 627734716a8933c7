"""The rules of several upstreams on their own: the choice (``gateway/upstream/router.py``), an
upstream's health (``gateway/upstream/health.py``, its clock handed in) and the settings that
configure them (``gateway/schema.py``). The same, for real, in ``test_upstreams.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from gateway.config import check_upstream_key
from gateway.schema import settings_from
from gateway.settings import ConfigError
from gateway.upstream.health import MAX_REST_SECONDS, Health
from gateway.upstream.router import covered, order, serves, union_of_lists


@dataclass
class Up:
    name: str
    weight: float = 1.0
    patterns: tuple[str, ...] = ("*",)
    current: float = 0.0


# --- the choice ---------------------------------------------------------------------------------

def test_weights_spread_requests_evenly_in_their_ratio() -> None:
    ups = [Up("a", 3), Up("b", 1)]
    firsts = [order(ups, None)[0].name for _ in range(400)]
    assert firsts.count("a") == 300
    assert "b" in firsts[:4] and "aaaa" not in "".join(firsts)[:8]  # spread, not in runs


def test_after_the_first_the_rest_follow_by_weight() -> None:
    ups = [Up("a", 1), Up("b", 5), Up("c", 2)]
    tried = order(ups, None)
    assert tried[0].name == "b" and [u.name for u in tried[1:]] == ["c", "a"]


def test_one_affinity_key_always_gets_the_same_upstream_and_keys_spread() -> None:
    ups = [Up("a"), Up("b"), Up("c")]
    assert len({order(ups, "conv-1")[0].name for _ in range(50)}) == 1
    homes = [order(ups, f"conv-{i}")[0].name for i in range(3000)]
    assert all(800 < homes.count(n) < 1200 for n in "abc")


def test_when_its_upstream_leaves_only_its_keys_move_and_they_come_back() -> None:
    ups = [Up("a"), Up("b"), Up("c")]
    keys = [f"conv-{i}" for i in range(300)]
    before = {k: order(ups, k)[0].name for k in keys}
    without_a = {k: order(ups[1:], k)[0].name for k in keys}
    assert all(without_a[k] == home for k, home in before.items() if home != "a")
    assert {k: order(ups, k)[0].name for k in keys} == before


def test_affinity_follows_the_weights() -> None:
    ups = [Up("a", 3), Up("b", 1)]
    homes = [order(ups, f"conv-{i}")[0].name for i in range(4000)]
    assert 0.70 < homes.count("a") / 4000 < 0.80


def test_models_are_matched_by_shell_patterns() -> None:
    up = Up("a", patterns=("grok-4*", "grok-3-mini"))
    assert serves(up, "grok-4-fast") and serves(up, "grok-3-mini") and serves(up, None)
    assert not serves(up, "grok-3") and not serves(up, "GROK-4")


def test_an_upstream_is_covered_only_where_the_others_serve_each_of_its_patterns() -> None:
    assert covered(Up("a", patterns=("grok-4",)), [Up("b", patterns=("grok-*",))])
    assert covered(Up("a"), [Up("b"), Up("c", patterns=("x",))])
    assert not covered(Up("a", patterns=("grok-*",)), [Up("b", patterns=("grok-4",))])
    assert not covered(Up("a"), [])


def test_model_lists_are_joined_each_filtered_by_its_upstream() -> None:
    a, b = Up("a", patterns=("grok-4*",)), Up("b")
    listing_a = {"data": [{"id": "grok-4", "owned_by": "a"}, {"id": "grok-3", "owned_by": "a"}]}
    listing_b = {"data": [{"id": "grok-4", "owned_by": "b"}, {"id": "llama", "owned_by": "b"}]}
    joined = union_of_lists([a, b], [listing_a, listing_b])
    assert joined["data"] == [{"id": "grok-4", "owned_by": "a"}, {"id": "llama", "owned_by": "b"}]
    assert union_of_lists([a, b], [ValueError("down"), {"data": "nonsense"}])["data"] == []


# --- health ---------------------------------------------------------------------------------------

def test_a_429_with_retry_after_rests_the_upstream_that_long() -> None:
    h = Health(3, 30)
    h.rate_limited(100.0, 7)
    assert not h.available(106.9) and h.state(106.9) == "resting"
    assert h.available(107.0) and h.state(107.0) == "ok"
    assert h.failures == 0  # a rest is no failure


def test_a_429_without_retry_after_rests_one_second_doubling_up_to_a_minute() -> None:
    h = Health(3, 30)
    rests = []
    now = 0.0
    for _ in range(9):
        h.rate_limited(now, None)
        rests.append(h.rest_until - now)
        now = h.rest_until
    assert rests == [1, 2, 4, 8, 16, 32, MAX_REST_SECONDS, MAX_REST_SECONDS, MAX_REST_SECONDS]
    h.succeeded()
    h.rate_limited(now, None)
    assert h.rest_until - now == 1


def test_failures_in_a_row_eject_then_one_trial_decides() -> None:
    h = Health(3, 30)
    assert not h.failed(0, True) and not h.failed(1, True)
    h.succeeded()  # the count starts again
    assert not h.failed(2, True) and not h.failed(3, True)
    assert h.failed(4, True) and h.state(5) == "ejected" and not h.available(33.9)
    assert h.available(34) and h.state(34) == "trial"
    h.chosen(34)
    assert not h.available(34)  # one trial at a time
    assert h.failed(35, True) and not h.available(64.9)  # failed: out again
    h.chosen(65)
    assert h.succeeded() and h.state(65) == "ok" and h.available(65)


def test_a_trial_whose_request_is_abandoned_is_given_back() -> None:
    h = Health(1, 10)
    h.failed(0, True)
    h.chosen(10)
    h.abandon()
    assert h.available(10)


def test_the_last_one_serving_a_model_is_never_ejected() -> None:
    h = Health(1, 10)
    assert not h.failed(0, False) and h.available(0)


# --- settings -----------------------------------------------------------------------------------

def upstreams(*entries: dict[str, Any], **upstream: Any) -> Any:
    return settings_from({"upstream": upstream, "upstreams": list(entries)})


A = {"name": "a", "url": "https://api.x.ai/v1", "api_key": "k" * 20}
B = {"name": "b", "url": "http://127.0.0.1:9000/v1", "api_key_env": "B_KEY", "weight": 3,
     "models": ["grok-4*"], "max_concurrent": 8}


def test_upstreams_are_read_with_their_defaults() -> None:
    s = upstreams(A, B, max_failovers=1, eject_after_failures=5, eject_seconds=10)
    a, b = s.upstream_entries
    assert (a.name, a.weight, a.models, a.max_concurrent) == ("a", 1.0, ("*",), 0)
    assert (b.weight, b.models, b.max_concurrent, b.key({"B_KEY": "bee"})) == (
        3.0, ("grok-4*",), 8, "bee")
    assert (s.upstream.max_failovers, s.upstream.eject_after_failures,
            s.upstream.eject_seconds) == (1, 5, 10.0)
    assert not s.uses_mock and "k" * 20 not in repr(s)


def test_upstream_alone_is_one_named_default() -> None:
    s = settings_from({"upstream": {"url": "https://example.com/v1", "api_key": "x" * 20}})
    (only,) = s.upstream_entries
    assert (only.name, only.url, only.key({})) == ("default", "https://example.com/v1", "x" * 20)


@pytest.mark.parametrize("entries, setting", [
    ([A, {**B, "name": "a"}], "upstreams"),
    ([{**A, "name": "has space"}], "upstreams[0].name"),
    ([{**A, "name": ""}], "upstreams[0].name"),
    ([{**A, "url": "ftp://x"}], "upstreams[a].url"),
    ([{**A, "api_key_env": "A_KEY"}], "upstreams[a]"),
    ([{"name": "a", "url": "https://x.ai/v1"}], "upstreams[a]"),
    ([{**A, "weight": 0}], "upstreams[a].weight"),
    ([{**A, "weight": "heavy"}], "upstreams[a].weight"),
    ([{**A, "models": []}], "upstreams[a].models"),
    ([{**A, "max_concurrent": -1}], "upstreams[a].max_concurrent"),
    ([{**A, "region": "eu"}], "upstreams[0].region"),
    (["not a table"], "upstreams[0]"),
])
def test_bad_upstreams_are_refused_naming_the_setting(entries: list[Any], setting: str) -> None:
    with pytest.raises(ConfigError) as e:
        upstreams(*entries)
    assert e.value.setting == setting


@pytest.mark.parametrize("upstream, setting", [
    ({"url": "https://x.ai/v1"}, "upstream.url"),
    ({"api_key": "k" * 20}, "upstream.api_key"),
    ({"max_failovers": -1}, "upstream.max_failovers"),
    ({"eject_after_failures": 0}, "upstream.eject_after_failures"),
    ({"eject_seconds": 0}, "upstream.eject_seconds"),
    ({"headers_timeout_seconds": -1}, "upstream.headers_timeout_seconds"),
])
def test_bad_upstream_settings_beside_upstreams_are_refused(upstream: dict[str, Any],
                                                            setting: str) -> None:
    with pytest.raises(ConfigError) as e:
        upstreams(A, **upstream)
    assert e.value.setting == setting


def test_serve_needs_every_upstreams_key_variable() -> None:
    s = upstreams(A, B)
    check_upstream_key(s, {"B_KEY": "bee"})
    with pytest.raises(ConfigError) as e:
        check_upstream_key(s, {})
    assert e.value.setting == "upstreams[b].api_key_env" and "B_KEY" in str(e.value)

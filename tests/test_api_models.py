"""GET models and models/{id}: the upstream's list, aliases added, filtered to the caller's key's
allow-list, cached per app for ``[models] list_cache_seconds``."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from openai import OpenAI

from gateway.mock.upstream import MODELS

from clients import async_sdk, get, in_thread
from conftest import KEY, OTHER_KEY, Upstream, settings_for

ALIASES = {"grok": "grok-4", "grok-mini": "grok-3-mini", "ghost": "no-such-upstream-model"}


def limited(upstream_url: str, **sections: Any) -> Any:
    """alice may use anything; bob only grok-4 and the alias grok-mini."""
    return settings_for(upstream_url, keys=[
        {"name": "alice", "key": KEY},
        {"name": "bob", "key": OTHER_KEY, "models": ["grok-4", "grok-mini"]}], **sections)


def model_fetches(upstream: Upstream) -> int:
    return sum(1 for r in upstream.state.requests if r["path"] == "/v1/models")


async def test_sdk_lists_the_upstream_models_with_aliases_sync_and_async(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(limited(mock_upstream.url, models={"aliases": ALIASES}))

    def use(client: OpenAI) -> list[str]:
        return [m.id for m in client.models.list()]

    sync_ids = await in_thread(base, use)
    client = async_sdk(base)
    async_ids = [m.id async for m in client.models.list()]
    await client.close()
    # Upstream names stay (they remain usable); aliases to listed models join them; an alias
    # to a model the upstream does not list does not appear.
    assert sync_ids == async_ids == [*MODELS, "grok", "grok-mini"]


async def test_list_is_filtered_to_the_keys_allow_list(mock_upstream: Upstream,
                                                       start_gateway: Any) -> None:
    _, base = await start_gateway(limited(mock_upstream.url, models={"aliases": ALIASES}))
    client = async_sdk(base, OTHER_KEY)
    page = await client.models.list()
    assert [m.id for m in page.data] == ["grok-4", "grok-mini"]
    mini = await client.models.retrieve("grok-mini")
    assert mini.id == "grok-mini" and mini.owned_by == "xai"
    # A model the key may not use looks like one that does not exist.
    for model in ("grok-3-mini", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve(model)
        assert caught.value.code == "model_not_found"
        assert caught.value.param == "model"
    await client.close()


async def test_a_model_id_with_a_slash_is_found(mock_upstream: Upstream,
                                               start_gateway: Any) -> None:
    """Routers name models ``vendor/model``: the id arrives escaped (the SDK) or as it is."""
    _, base = await start_gateway(settings_for(mock_upstream.url, models={
        "aliases": {"x-ai/grok-4": "grok-4"}}))
    raw = await get(f"{base}/v1/models/x-ai/grok-4")
    assert raw.status == 200 and raw.json()["id"] == "x-ai/grok-4"
    client = async_sdk(base)
    assert (await client.models.retrieve("x-ai/grok-4")).id == "x-ai/grok-4"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("x-ai/no-such-model")
    await client.close()


async def test_raw_list_shape_and_headers(gateway: Any) -> None:
    _, base = gateway
    raw = await get(f"{base}/v1/models")
    assert raw.status == 200
    assert raw.headers["Content-Type"].startswith("application/json")
    assert raw.headers["X-Request-ID"]
    body = raw.json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} == set(MODELS)
    assert all(m["object"] == "model" for m in body["data"])
    one = await get(f"{base}/api/v1/models/grok-4")
    assert one.json() == next(m for m in body["data"] if m["id"] == "grok-4")


async def test_list_is_cached_for_the_configured_time(mock_upstream: Upstream,
                                                      start_gateway: Any) -> None:
    _, base = await start_gateway(limited(mock_upstream.url,
                                          models={"list_cache_seconds": 0.3}))
    for key in (KEY, OTHER_KEY, KEY):
        assert (await get(f"{base}/api/v1/models", key)).status == 200
    assert (await get(f"{base}/api/v1/models/grok-4")).status == 200
    assert model_fetches(mock_upstream) == 1  # one cache for every key and both routes
    await asyncio.sleep(0.35)
    await get(f"{base}/api/v1/models")
    assert model_fetches(mock_upstream) == 2


async def test_concurrent_misses_ask_the_upstream_once(gateway: Any,
                                                       mock_upstream: Upstream) -> None:
    _, base = gateway
    results = await asyncio.gather(*(get(f"{base}/api/v1/models") for _ in range(8)))
    assert all(r.status == 200 for r in results)
    assert model_fetches(mock_upstream) == 1


async def test_no_cache_when_the_time_is_zero(mock_upstream: Upstream,
                                              start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               models={"list_cache_seconds": 0}))
    await get(f"{base}/api/v1/models")
    await get(f"{base}/api/v1/models")
    assert model_fetches(mock_upstream) == 2


async def test_one_cache_per_app(mock_upstream: Upstream, start_gateway: Any) -> None:
    _, first = await start_gateway(settings_for(mock_upstream.url))
    _, second = await start_gateway(settings_for(mock_upstream.url))
    await get(f"{first}/api/v1/models")
    await get(f"{second}/api/v1/models")
    await get(f"{first}/api/v1/models")
    assert model_fetches(mock_upstream) == 2

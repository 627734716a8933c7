"""Stored responses through the gateway, with the real OpenAI SDK: each response is its
creator's. The creating key retrieves it, lists its input items, resumes its stream and deletes
it; any other key, and any id the gateway never saw, gets the same 404 for each, and the
upstream is not asked."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from clients import async_sdk, get, post, scrape
from conftest import OTHER_KEY, Upstream


def _upstream_calls(upstream: Upstream) -> list[tuple[str, str]]:
    return [(r["method"], r["path"]) for r in upstream.state.requests]


async def test_own_response_is_retrieved_listed_deleted_and_then_gone(gateway: Any) -> None:
    _, base = gateway
    client = async_sdk(base)
    created = await client.responses.create(model="grok-4", input="Explain quantum computing")
    got = await client.responses.retrieve(created.id)
    assert got.id == created.id and got.output_text == created.output_text
    items = await client.responses.input_items.list(created.id)
    assert [i.type for i in items.data] == ["message"]
    assert items.data[0].content[0].text == "Explain quantum computing"  # type: ignore[union-attr]
    assert await client.responses.delete(created.id) is None
    with pytest.raises(openai.NotFoundError) as gone:
        await client.responses.retrieve(created.id)
    assert gone.value.body["message"] == f"Response with id '{created.id}' not found."
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_items.list(created.id)
    await client.close()


async def test_a_streamed_response_is_the_creators_as_soon_as_the_stream_ends(
        gateway: Any) -> None:
    _, base = gateway
    client = async_sdk(base)
    stream = await client.responses.create(model="grok-4", input="hi", stream=True)
    events = [e async for e in stream]
    rid = events[0].response.id  # type: ignore[union-attr]
    got = await client.responses.retrieve(rid)  # at once: recorded before the id went out
    final = events[-1].response  # type: ignore[union-attr]
    assert got.status == "completed" and got.output_text == final.output_text
    await client.close()


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_another_key_gets_404_for_everything_and_the_upstream_is_not_asked(
        gateway: Any, mock_upstream: Upstream, prefix: str) -> None:
    _, base = gateway
    created = (await post(f"{base}{prefix}/responses",
                          {"model": "grok-4", "input": "mine", "background": True})).json()
    rid = created["id"]
    calls = len(mock_upstream.state.requests)

    bob = async_sdk(base, OTHER_KEY)
    attempts = [bob.responses.retrieve(rid), bob.responses.input_items.list(rid),
                bob.responses.delete(rid), bob.responses.cancel(rid)]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError) as refused:
            await attempt
        assert refused.value.body == {"message": f"Response with id '{rid}' not found.",
                                      "type": "invalid_request_error", "param": None,
                                      "code": "not_found"}
    with pytest.raises(openai.NotFoundError) as continued:
        await bob.responses.create(model="grok-4", input="and then?", previous_response_id=rid)
    assert continued.value.body["code"] == "previous_response_not_found"
    assert continued.value.body["param"] == "previous_response_id"
    await bob.close()
    assert len(mock_upstream.state.requests) == calls  # none of it reached the upstream

    # The same answer as for an id the gateway never saw, and for one no upstream could make.
    mine_to_bob = await get(f"{base}{prefix}/responses/{rid}", OTHER_KEY)
    never = await get(f"{base}{prefix}/responses/resp_never_made")
    hostile = await get(f"{base}{prefix}/responses/{'x' * 300}")
    assert mine_to_bob.status == never.status == hostile.status == 404
    assert never.body == mine_to_bob.body.replace(rid.encode(), b"resp_never_made")
    assert hostile.error() == {**never.error(), "message": "Response not found."}
    assert len(mock_upstream.state.requests) == calls

    # The owner still has it: cancel (a background response), then delete.
    owner = async_sdk(base)
    cancelled = await owner.responses.cancel(rid)
    assert cancelled.status == "cancelled"
    await owner.responses.delete(rid)
    await owner.close()


async def test_a_continuation_of_the_keys_own_response_goes_up(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    client = async_sdk(base)
    first = await client.responses.create(model="grok-4", input="hi")
    second = await client.responses.create(model="grok-4", input="more",
                                           previous_response_id=first.id)
    assert second.id != first.id
    assert mock_upstream.state.requests[-1]["body"]["previous_response_id"] == first.id
    await client.close()


async def test_a_resumed_stream_is_the_upstreams_bytes_after_starting_after(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    original = await post(f"{base}/api/v1/responses",
                          {"model": "grok-4", "input": "hi", "stream": True})
    events = original.events()
    rid = orjson.loads(events[0].split(b"data: ", 1)[1])["response"]["id"]
    query = f"responses/{rid}?stream=true&starting_after=3"
    resumed = await get(f"{base}/api/v1/{query}")
    direct = await get(f"{mock_upstream.url}/{query}")
    assert resumed.status == 200
    assert resumed.headers["Content-Type"] == "text/event-stream"
    assert resumed.body == direct.body == b"".join(events[4:])
    assert mock_upstream.state.requests[-2]["path"] == f"/v1/responses/{rid}"

    client = async_sdk(base)
    replay = await client.responses.retrieve(rid, stream=True, starting_after=15)
    assert [e.sequence_number async for e in replay] == [16, 17]
    await client.close()


async def test_a_response_the_upstream_does_not_store_is_not_recorded(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    client = async_sdk(base)
    created = await client.responses.create(model="grok-4", input="hi", store=False)
    calls = len(mock_upstream.state.requests)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    assert len(mock_upstream.state.requests) == calls
    await client.close()


async def test_a_query_is_passed_on_re_encoded_and_bounded(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    client = async_sdk(base)
    created = await client.responses.create(model="grok-4", input="hi")
    page = await client.responses.input_items.list(created.id, limit=1, order="asc")
    assert len(page.data) == 1
    sent = mock_upstream.state.requests[-1]
    assert sent["path"] == f"/v1/responses/{created.id}/input_items"
    too_many = "&".join(f"p{i}=1" for i in range(40))
    refused = await get(f"{base}/api/v1/responses/{created.id}/input_items?{too_many}")
    assert refused.status == 400 and "query is too long" in refused.error()["message"]
    await client.close()


async def test_a_vision_stream_answered_whole_is_the_creators_too(gateway: Any) -> None:
    _, base = gateway
    answered = await post(f"{base}/api/v1/responses", {
        "model": "grok-4", "stream": True, "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "What is it?"},
            {"type": "input_image", "image_url": "https://example.com/cat.png"}]}]})
    assert answered.headers["X-Stream-Fallback"] == "true"
    rid = orjson.loads(answered.events()[0].split(b"data: ", 1)[1])["response"]["id"]
    assert (await get(f"{base}/api/v1/responses/{rid}")).status == 200
    assert (await get(f"{base}/api/v1/responses/{rid}", OTHER_KEY)).status == 404


async def test_reading_a_stored_response_again_counts_no_tokens(gateway: Any) -> None:
    """Its tokens were counted when it was made (``gateway_tokens_total``), once."""
    _, base = gateway
    client = async_sdk(base)
    created = await client.responses.create(model="grok-4", input="hi")
    made = await _prompt_tokens(base)
    await client.responses.retrieve(created.id)
    async for _ in await client.responses.retrieve(created.id, stream=True):
        pass
    assert await _prompt_tokens(base) == made == 12
    await client.close()


async def _prompt_tokens(base: str) -> float:
    samples = await scrape(base)
    return sum(v for (name, labels), v in samples.items()
               if name == "gateway_tokens_total" and ("type", "prompt") in labels)

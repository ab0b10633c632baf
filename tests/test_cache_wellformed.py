"""A stream with a malformed event is relayed as it came, but never stored and replayed as a hit."""

from __future__ import annotations

import httpx
import pytest

from .harness import body, weir_and_mock

KEY = {"x-api-key": "sk-client", "anthropic-version": "2023-06-01", "x-weir-cache": "on"}


@pytest.mark.parametrize("coalesce", [True, False])
async def test_malformed_stream_is_not_replayed_to_a_later_clean_request(coalesce: bool) -> None:
    data = body(stream=True, messages=[{"role": "user", "content": f"malformed then clean {coalesce}"}])
    async with weir_and_mock(cache={"l2": "none", "coalesce": coalesce}) as (weir, mock), httpx.AsyncClient(base_url=weir.url) as client:
        first = await client.post("/v1/messages", content=data, headers={**KEY, "x-mock-fault": "malformed"})
        assert first.status_code == 200 and b'"delta":{"type":\n\n' in first.content  # relayed as the upstream sent it
        assert first.headers["x-weir-cache"] == "miss"
        clean = await client.post("/v1/messages", content=data, headers=KEY)
        assert clean.headers["x-weir-cache"] == "miss", "the malformed stream was stored"
        assert b'"delta":{"type":\n\n' not in clean.content and clean.content.rstrip().endswith(b'{"type":"message_stop"}')
        again = await client.post("/v1/messages", content=data, headers=KEY)
        assert again.headers["x-weir-cache"] == "hit" and again.content == clean.content  # a clean stream still is
        assert mock.calls == 2

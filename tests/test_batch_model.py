"""The batch model: the create body's validation, and the JSON the official
SDK parses (its own pydantic types are the judge here)."""

from __future__ import annotations

import json

import msgspec
import pytest
from anthropic.types.messages import DeletedMessageBatch, MessageBatch, MessageBatchIndividualResponse
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.batches.model import Batch, Counts, Limits, new_batch_id, page_json, parse_create, batch_json, deleted_json, result_line, rfc3339
from proxy.errors import ProxyError
from proxy.settings import BatchSettings, SettingsError, load_settings, settings_from_dict

PARAMS = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
T0 = 1_764_633_600_000_000  # 2025-12-02T00:00:00Z


def body(*items: dict) -> bytes:
    return json.dumps({"requests": list(items)}).encode()


def req(cid: str, **params) -> dict:
    return {"custom_id": cid, "params": {**PARAMS, **params}}


def refused(raw: bytes, limits=Limits(), status: int = 400) -> str:
    with pytest.raises(ProxyError) as err:
        parse_create(raw, limits)
    assert err.value.status == status
    doc = json.loads(err.value.body())
    assert doc["type"] == "error" and doc["error"]["type"] == ("invalid_request_error" if status == 400 else "request_too_large")
    return err.value.message


def test_items_keep_the_clients_bytes_in_order() -> None:
    raw = b'{"requests":[{"custom_id":"a","params":{"max_tokens":16,  "model":"m","messages":[{"role":"user","content":"x"}],"z":1}},' \
          b'{"params":' + json.dumps(PARAMS).encode() + b',"custom_id":"b-2_"}]}'  # fmt: skip
    items = parse_create(raw, Limits())
    assert [i.custom_id for i in items] == ["a", "b-2_"]
    assert items[0].params == b'{"max_tokens":16,  "model":"m","messages":[{"role":"user","content":"x"}],"z":1}'
    assert json.loads(items[1].params) == PARAMS


def test_settings_are_limits() -> None:
    assert len(parse_create(body(req("a")), BatchSettings())) == 1


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (b"", "empty"),
        (b"[]", "invalid request"),
        (b'{"requests": []}', "at least one"),
        (b'{"requests": [1]}', "requests[0]"),
        (body({"custom_id": "a"}), "params"),
        (body(req("has space")), "requests.0.custom_id"),
        (body(req("")), "requests.0.custom_id"),
        (body(req("x" * 65)), "requests.0.custom_id"),
        (body(req("ok"), req("é")), "requests.1.custom_id"),
        (body(req("a"), req("b"), req("a")), "'a' is used more than once"),
        (body(req("a"), req("b", max_tokens=0)), "custom_id 'b'"),
        (body(req("a", messages=[])), "messages"),
        (body({"custom_id": "a", "params": {"model": "m"}}), "max_tokens"),
        (body(req("a", stream=True)), "streaming"),
        (b'{"requests": [{"custom_id": "a", "params": {"model": "m", "model": "n", "max_tokens": 1, "messages": [{}]}}]}', "more than once"),
    ],
)
def test_bad_bodies_are_400s_naming_the_offender(raw: bytes, named: str) -> None:
    assert named in refused(raw)


def test_settings_section_env_and_per_upstream_mode() -> None:
    s = load_settings(environ={"WEIR_BATCHES__EXPIRY_S": "5", "WEIR_BATCHES__MAX_REQUESTS": "7"})
    assert (s.batches.expiry_s, s.batches.max_requests, s.batches.results_days) == (5.0, 7, 29)
    s = settings_from_dict({"upstreams": [{"name": "o", "kind": "openai"}, {"name": "a"}, {"name": "w", "batches": "weir"}]})
    assert [u.batch_mode() for u in s.upstreams] == ["weir", "passthrough", "weir"]
    with pytest.raises(SettingsError, match="only Anthropic has a batch API"):
        settings_from_dict({"upstreams": [{"name": "o", "kind": "openai", "batches": "passthrough"}]})
    with pytest.raises(SettingsError, match="batches"):
        settings_from_dict({"batches": {"lease_s": 0}})


def test_limits_on_count_and_bytes() -> None:
    three = body(req("a"), req("b"), req("c"))
    assert len(parse_create(three, Limits(max_requests=3))) == 3
    assert "limit is 2" in refused(three, Limits(max_requests=2))
    assert "limit is 100" in refused(three, Limits(max_bytes=100), status=413)


def test_ids_look_like_anthropics() -> None:
    ids = {new_batch_id() for _ in range(100)}
    assert len(ids) == 100
    for i in ids:
        assert i.startswith("msgbatch_") and len(i) == 33 and i[9:].isalnum()


def test_batch_json_parses_as_the_sdks_message_batch() -> None:
    b = Batch(id="msgbatch_x", tenant="t", created_at=T0, expires_at=T0 + 86_400_000_000, counts=Counts(processing=3, succeeded=2, errored=1))
    m = MessageBatch.model_validate_json(batch_json(b, "http://127.0.0.1:8080/"))
    assert m.type == "message_batch" and m.processing_status == "in_progress" and m.results_url is None
    # Anthropic's contract: processing until the whole batch has ended.
    assert (m.request_counts.processing, m.request_counts.succeeded, m.request_counts.errored) == (6, 0, 0)
    assert m.created_at.isoformat() == "2025-12-02T00:00:00+00:00" and m.expires_at.day == 3
    assert m.ended_at is None and m.cancel_initiated_at is None and m.archived_at is None

    pt = msgspec.structs.replace(b, mode="passthrough")  # shown as its upstream said
    assert MessageBatch.model_validate_json(batch_json(pt, "http://h")).request_counts.succeeded == 2

    done = msgspec.structs.replace(b, processing_status="ended", ended_at=T0 + 5, cancel_initiated_at=T0 + 1, counts=Counts(succeeded=2, errored=1, canceled=3))
    m = MessageBatch.model_validate_json(batch_json(done, "http://127.0.0.1:8080/"))
    assert m.results_url == "http://127.0.0.1:8080/v1/messages/batches/msgbatch_x/results"
    assert m.request_counts.model_dump() == {"processing": 0, "succeeded": 2, "errored": 1, "canceled": 3, "expired": 0}
    assert m.ended_at.microsecond == 5 and m.cancel_initiated_at.microsecond == 1
    assert rfc3339(T0 + 100_435) == "2025-12-02T00:00:00.100435Z"


def test_page_and_deleted_shapes() -> None:
    bs = [Batch(id=f"msgbatch_{i}", tenant="t", created_at=T0, expires_at=T0) for i in (2, 1)]
    page = json.loads(page_json(bs, True, "http://h"))
    assert (page["first_id"], page["last_id"], page["has_more"]) == ("msgbatch_2", "msgbatch_1", True)
    assert [MessageBatch.model_validate(d).id for d in page["data"]] == ["msgbatch_2", "msgbatch_1"]
    assert json.loads(page_json([], False, "http://h")) == {"data": [], "has_more": False, "first_id": None, "last_id": None}
    assert DeletedMessageBatch.model_validate_json(deleted_json("msgbatch_1")).id == "msgbatch_1"


MESSAGE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1},
}  # fmt: skip


def test_result_lines_parse_as_the_sdks_individual_responses() -> None:
    lines = [
        result_line("a", "succeeded", json.dumps(MESSAGE).encode()),
        result_line("b", "errored", b'{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}'),
        result_line("c", "errored"),
        result_line("d", "canceled"),
        result_line("e", "expired"),
    ]
    assert all(line.endswith(b"}\n") and line.count(b"\n") == 1 for line in lines)
    got = [MessageBatchIndividualResponse.model_validate_json(line) for line in lines]
    assert [g.custom_id for g in got] == list("abcde")
    assert [g.result.type for g in got] == ["succeeded", "errored", "errored", "canceled", "expired"]
    assert got[0].result.message.content[0].text == "hi"
    assert got[1].result.error.error.message == "bad" and got[2].result.error.error.type == "api_error"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
message_like = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=5)})
# Mostly near-valid, so both outcomes are reached: a small id pool makes
# duplicates, and every field is sometimes anything at all, or missing.
custom_id_like = st.sampled_from(["a", "b", "c-1", "d_2"]) | st.from_regex(r"[a-zA-Z0-9_-]{1,64}", fullmatch=True) | st.text(max_size=70) | json_values
valid_params = st.fixed_dictionaries(
    {"model": st.sampled_from(["m", "claude-x"]), "max_tokens": st.integers(1, 5), "messages": st.lists(message_like, min_size=1, max_size=2)},
    optional={"stream": st.booleans(), "temperature": st.floats(0, 1)},
)
# A valid body with at most one field replaced by anything at all, or anything at all.
params_like = st.builds(
    lambda base, broken: {**base, **broken}, valid_params, st.dictionaries(st.sampled_from(["model", "max_tokens", "messages", "stream"]), json_values, max_size=1)
) | json_values
item_like = st.fixed_dictionaries({"custom_id": custom_id_like, "params": params_like}) | st.fixed_dictionaries(
    {}, optional={"custom_id": custom_id_like, "params": params_like}
)
create_like = st.fixed_dictionaries({"requests": st.lists(item_like, max_size=4) | json_values}) | json_values


@settings(max_examples=300, deadline=None)
@given(doc=create_like, junk=st.binary(max_size=4))
def test_fuzz_parse_create_returns_items_or_a_400(doc, junk: bytes) -> None:
    raw = json.dumps(doc).encode() + junk
    try:
        items = parse_create(raw, Limits(max_requests=3))
    except ProxyError as err:
        assert err.status == 400 and err.type == "invalid_request_error" and err.message
        assert json.loads(err.body())["error"]["message"] == err.message
        return
    assert 1 <= len(items) <= 3 and len({i.custom_id for i in items}) == len(items)
    for i in items:
        assert json.loads(i.params).get("stream") in (None, False)

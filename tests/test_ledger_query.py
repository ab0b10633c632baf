"""The admin API's query parsing: any input is a Query or a BadQuery naming the parameter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.ledger.query import BadQuery, parse_time, requests_query, usage_query
from proxy.settings import SettingsError, settings_from_dict

NOW = 1_800_000_000.0


def test_times_in_three_forms():
    assert parse_time("since", "24h", NOW) == int((NOW - 86400) * 1e6)
    assert parse_time("since", "30m", NOW) == int((NOW - 1800) * 1e6)
    assert parse_time("since", "1700000000", NOW) == 1_700_000_000_000_000
    assert parse_time("since", "2026-12-01T00:00:00Z", NOW) == parse_time("since", "2026-12-01T00:00:00", NOW) == 1_796_083_200_000_000
    assert parse_time("since", None, NOW) is None


@pytest.mark.parametrize(
    "args, name",
    [({"limit": "lots"}, "limit"), ({"limit": "0"}, "limit"), ({"limit": "100000"}, "limit"), ({"status": "ok"}, "status"), ({"since": "last tuesday"}, "since"), ({"since": "inf"}, "since"), ({"until": "1e400"}, "until"),
     ({"since": "nan"}, "since"), ({"since": "99999999999d"}, "since"), ({"since": "-5"}, "since")],
)
def test_bad_parameters_name_themselves(args, name):
    with pytest.raises(BadQuery, match=name):
        requests_query(args, NOW)


def test_group_by_is_a_closed_set():
    assert usage_query({"group_by": "model"}, NOW)[0] == "model"
    with pytest.raises(BadQuery, match="group_by"):
        usage_query({"group_by": "tenant; DROP TABLE ledger_requests"}, NOW)


_TIMEISH = st.one_of(st.text(max_size=40), st.floats().map(str), st.integers().map(lambda n: f"{n}d"), st.datetimes().map(str))


@given(st.dictionaries(st.sampled_from(["tenant", "model", "status", "since", "until", "limit", "ended_since", "group_by", "batch_id"]), _TIMEISH))
def test_any_query_string_parses_or_is_refused_cleanly(args):
    for parse in (requests_query, usage_query):
        try:
            parse(args, NOW)
        except BadQuery:
            pass


@pytest.mark.parametrize(
    "ledger, words",
    [({"url": "mysql://db"}, "ledger.url"), ({"flush_rows": 0}, "flush_rows"), ({"retention_days": 0}, "retention"), ({"bodies": "some"}, "bodies")],
)
def test_ledger_settings_are_checked(ledger, words):
    with pytest.raises(SettingsError, match=words):
        settings_from_dict({"ledger": ledger})

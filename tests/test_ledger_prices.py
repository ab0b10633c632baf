"""The price table: integer micro-dollars, first match wins, overrides change the version."""

from __future__ import annotations

import pytest

from proxy.ledger.prices import load_prices


def test_shipped_table_prices_current_models():
    t = load_prices()
    assert t.version
    # $3/MTok in, $15 out, $0.30 cache read, $3.75 cache write → micro-dollars per token.
    assert t.cost("claude-sonnet-4-5-20250929", 1000, 500, 2000, 100) == (3000 + 7500 + 600 + 375, t.version)
    assert t.cost("claude-opus-4-20250514", 1, 1)[0] == 90  # Opus 4.0 kept the old price
    assert t.cost("claude-opus-4-1-20250805", 1, 1)[0] == 90
    assert t.cost("claude-opus-4-5", 1, 1)[0] == 30
    assert t.cost("claude-haiku-4-5", 1_000_000, 0)[0] == 1_000_000
    for model in ("claude-opus-5", "claude-sonnet-5-0", "claude-haiku-5", "gpt-4o", "gpt-4o-mini", "gpt-5", "o3", "deepseek-chat"):
        assert t.cost(model, 1000, 1000)[0] > 0, model
    assert t.cost("gpt-4o-mini", 1_000_000, 0)[0] == 150_000  # the specific entry, not gpt-4o's


def test_unknown_model_costs_nothing_and_says_so():
    assert load_prices().cost("my-local-llama", 100, 100) == (0, "")


def test_overrides_win_and_version_the_table():
    base = load_prices()
    t = load_prices(overrides={"claude-sonnet-4-5": {"input": 1.0, "output": 1.0}, "my-llama": {"input": 0.5, "output": 0.5}})
    assert t.version != base.version and t.version.startswith(base.version + "+cfg.")
    assert t.cost("claude-sonnet-4-5", 10, 10) == (20, t.version)
    assert t.cost("my-llama", 10, 10)[0] == 10


def test_a_table_of_ones_own(tmp_path):
    p = tmp_path / "prices.toml"
    p.write_text('version = "ours-1"\n[[models]]\nmatch = "*"\ninput = 2.0\noutput = 4.0\n')
    assert load_prices(str(p)).cost("anything", 1, 1) == (6, "ours-1")
    p.write_text('version = "ours-1"\n[[models]]\nmatch = "*"\ninput = "cheap"\n')
    with pytest.raises(ValueError):
        load_prices(str(p))

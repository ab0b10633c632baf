"""Cost of a request, in integer micro-dollars, from a versioned price table.

Prices are US dollars per million tokens, which is also micro-dollars per
token: cost = Σ tokens × price, rounded once at the end. Integers in the
ledger, so sums over millions of rows are exact.

The table ships as ``prices.toml`` beside this module; ``[ledger]
prices_path`` replaces it and ``[ledger.prices]`` overrides single models.
An override changes the version (``<file version>+cfg.<hash>``), so rows
always say which prices they were charged.
"""

from __future__ import annotations

import fnmatch
import hashlib
import tomllib
from importlib import resources

import msgspec

__all__ = ["Price", "PriceTable", "load_prices"]

_GLOB = frozenset("*?[")


class Price(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    match: str = ""
    input: float
    output: float
    cache_read: float = 0.0
    cache_write: float = 0.0


class _File(msgspec.Struct, forbid_unknown_fields=True):
    version: str
    models: list[Price] = []


class PriceTable:
    def __init__(self, version: str, prices: list[Price]) -> None:
        self.version = version
        self._exact = {p.match: p for p in reversed(prices) if not _GLOB.intersection(p.match)}
        self._ordered = prices
        self._memo: dict[str, Price | None] = {}

    def price(self, model: str) -> Price | None:
        try:
            return self._memo[model]
        except KeyError:
            pass
        found = self._exact.get(model)
        if found is None:
            for p in self._ordered:
                if _GLOB.intersection(p.match) and fnmatch.fnmatchcase(model, p.match):
                    found = p
                    break
        if len(self._memo) < 4096:  # model names come from clients: bound the memo
            self._memo[model] = found
        return found

    def cost(self, model: str, input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0) -> tuple[int, str]:
        """(micro-dollars, price version); (0, "") when the model has no price."""
        p = self.price(model)
        if p is None:
            return 0, ""
        micros = input_tokens * p.input + output_tokens * p.output + cache_read * p.cache_read + cache_write * p.cache_write
        return round(micros), self.version


def load_prices(path: str = "", overrides: dict[str, dict[str, float]] | None = None) -> PriceTable:
    """The shipped table, or the file at ``path``, with ``overrides`` first."""
    if path:
        with open(path, "rb") as f:
            raw = f.read()
    else:
        raw = resources.files(__package__).joinpath("prices.toml").read_bytes()
    try:
        doc = msgspec.convert(tomllib.loads(raw.decode()), _File)
    except (msgspec.ValidationError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"price table {path or 'prices.toml'}: {exc}") from None
    prices = list(doc.models)
    version = doc.version
    if overrides:
        try:
            extra = [msgspec.convert({**v, "match": k}, Price) for k, v in overrides.items()]
        except msgspec.ValidationError as exc:
            raise ValueError(f"ledger.prices: {exc}") from None
        prices = extra + prices
        digest = hashlib.sha256(msgspec.json.encode(extra)).hexdigest()[:8]
        version = f"{version}+cfg.{digest}"
    return PriceTable(version, prices)

"""The request ledger: every request a row, off the hot path, nothing lost.

- ``row`` — ``LedgerRow``, the one narrow row per request;
- ``capture`` — a finished request's ``Outcome`` → its row;
- ``prices`` and ``prices.toml`` — cost in integer micro-dollars, versioned;
- ``store`` — what the two backends share; ``sqlite`` (the embedded default,
  one file per host) and ``postgres`` (many hosts: COPY, daily partitions);
- ``spool`` — the append-only local spool that keeps rows through an outage;
- ``query`` — the admin API's query strings, parsed;
- ``writer`` and ``service`` — the trio shell: the per-worker writer task,
  and ``serve_ledger``, which runs it in the app's lifespan nursery and hands
  back the ``Ledger`` the app and the admin API use.

Everything but the shell is free of trio (tests/test_layout.py holds it to
that), so this package imports none of it: import from the modules.
"""

"""Message Batches run by Weir (issue 13): Anthropic's batch API on every upstream.

One module per part (docs/ARCHITECTURE.md): ``model`` (the record, the create
body's validation, the JSON clients see; pure), ``store`` (the backends'
interface), ``sqlite`` and ``postgres`` (blocking stores in the ledger's
database), ``service`` (picks the backend) — all trio-free
(tests/test_layout.py) — and the trio shell (the runner, the HTTP
handlers, and ``passthrough``: Anthropic's own batch API behind Weir). The
package imports none of them: import the module you need.
"""

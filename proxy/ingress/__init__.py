"""The two ways into Weir, each in its own dialect.

- ``anthropic.py``: ``/v1/messages`` and ``count_tokens`` — the envelope Weir
  reads from a Messages body, and the local token estimate for targets that
  have no counter.
- ``openai.py``: ``/v1/chat/completions`` — the chat envelope, and the one
  edge where Weir's Anthropic-shaped errors become OpenAI-shaped.

Below this layer everything speaks one language: the body stays the client's
bytes, errors are Anthropic-shaped, and the upstream adapters
(``proxy/upstream/adapters.py``) translate between dialects when a target
speaks the other one.
"""

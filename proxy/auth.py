"""identify: who is calling, and which credentials go upstream.

Two modes. With client keys configured, a client presents one of them
(``x-api-key`` or ``Authorization: Bearer``), it maps to a tenant, and the
upstream key comes from Weir's config. With none configured, Weir is a
passthrough: the client's own credentials go upstream unchanged and the
tenant is derived from them, so per-tenant fairness, limits and cache scopes
still hold between different keys.

Keys are looked up by their SHA-256, so the table never holds a secret and
the dict lookup leaks nothing about it; the final equality check is
``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ProxyError
from .settings import AuthSettings

__all__ = ["Identity", "Authenticator", "key_fingerprint"]


def key_fingerprint(secret: str | bytes) -> str:
    """A stable, non-secret name for a key, safe for logs and tenant ids."""
    raw = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    # True when the client's own credentials must be forwarded upstream.
    passthrough: bool
    weight: float = 1.0


def presented_key(headers: Mapping[bytes, bytes]) -> bytes | None:
    key = headers.get(b"x-api-key")
    if key:
        return key
    auth = headers.get(b"authorization")
    if auth and auth[:7].lower() == b"bearer ":
        return auth[7:].strip() or None
    return None


class Authenticator:
    def __init__(self, settings: AuthSettings, environ: Mapping[str, str]) -> None:
        self._by_digest: dict[bytes, tuple[bytes, str, float]] = {}
        for ck in settings.client_keys:
            key = ck.key or environ.get(ck.key_env, "")
            if not key:
                continue  # an unset key_env: that tenant simply cannot log in
            raw = key.encode()
            self._by_digest[hashlib.sha256(raw).digest()] = (raw, ck.tenant, ck.weight)
        admin = settings.admin_key or (environ.get(settings.admin_key_env, "") if settings.admin_key_env else "")
        self._admin = admin.encode() if admin else b""
        self.passthrough = not self._by_digest

    def identify(self, headers: Mapping[bytes, bytes]) -> Identity:
        key = presented_key(headers)
        if self.passthrough:
            if key is None:
                # Anthropic itself would answer this; we answer it the same way
                # so a misconfigured client learns at once.
                raise ProxyError(401, "x-api-key header is required", "authentication_error")
            return Identity(tenant="key:" + key_fingerprint(key), passthrough=True)
        if key is None:
            raise ProxyError(401, "x-api-key header is required", "authentication_error")
        found = self._by_digest.get(hashlib.sha256(key).digest())
        if found is None or not hmac.compare_digest(found[0], key):
            raise ProxyError(401, "invalid x-api-key", "authentication_error")
        return Identity(tenant=found[1], passthrough=False, weight=found[2])

    def is_admin(self, headers: Mapping[bytes, bytes]) -> bool:
        if not self._admin:
            return False
        key = presented_key(headers)
        return key is not None and hmac.compare_digest(key, self._admin)

    @property
    def admin_secret(self) -> bytes:
        """The admin key itself, for signing the dashboard's session cookie; b"" when unset."""
        return self._admin

    @property
    def admin_enabled(self) -> bool:
        return bool(self._admin)

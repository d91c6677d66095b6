"""API keys from Secrets labelled ``modelguard.io/api-keys=true``."""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from controlplane.identity import apikeys

log = logging.getLogger(__name__)

API_KEYS_LABEL: Final = "modelguard.io/api-keys=true"


@dataclass
class ApiKeys:
    """API keys of labelled Secrets as SHA-256 digests, by (namespace, secret name).

    Values are read as ``modelguard serve --api-keys`` files are: a key (hashed here and
    never kept) or ``sha256:<64 hex>``; surrounding whitespace (``echo | base64``) is
    dropped. A value that is neither is reported with its Secret and key, never its value.
    """

    _keys: dict[tuple[str, str], tuple[apikeys.ApiKey, ...]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        annotations: Mapping[str, Any] | None = None,
    ) -> None:
        values: list[tuple[str, str | None, str]] = []
        for client, value in sorted(data.items()):
            try:
                text: str | None = base64.b64decode(value, validate=True).decode().strip()
            except (ValueError, UnicodeDecodeError):
                text = None
            values.append((str(client), text, "data"))
        problems: list[str] = []
        # Tenants, tiers and principals come from annotations, as in --api-keys files.
        keys = apikeys.keys_of(values, annotations or {}, f"Secret {namespace}/{name}", problems)
        for problem in problems:
            log.error("%s", problem)
        with self._lock:
            self._keys[(namespace, name)] = keys

    def remove(self, namespace: str, name: str) -> None:
        with self._lock:
            self._keys.pop((namespace, name), None)

    def secrets(self, namespace: str | None = None) -> list[tuple[str, str]]:
        """(namespace, name) of the Secrets holding keys, in ``namespace`` (None: all)."""
        with self._lock:
            return [k for k in self._keys if namespace is None or k[0] == namespace]

    def hashes(self, namespace: str, name: str) -> frozenset[str]:
        with self._lock:
            return frozenset(key.digest for key in self._keys.get((namespace, name), ()))

    def digests(self) -> dict[tuple[str, str], tuple[apikeys.ApiKey, ...]]:
        """Every Secret's keys (id, digest, metadata): the identity box's API-key input."""
        with self._lock:
            return dict(self._keys)

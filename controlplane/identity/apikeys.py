"""API keys of callers outside the mesh, loaded as SHA-256 digests.

Keys live in Kubernetes-style Secrets, so the same file works with ``kubectl apply``::

    apiVersion: v1
    kind: Secret
    metadata: {name: partner-keys, namespace: ml}
    stringData:
      partner-a: "the key itself"          # hashed on load, never kept in memory
      partner-b: "sha256:9f86d08188..."    # or only its digest

``AccessPolicy`` rules name a Secret (``apiKeys.secretRef``) in their own namespace. Only
digests leave this module: generated configuration, logs and status never see a key. A
file with problems is reported with its path (never with a value) and skipped, while the
other files keep working.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

Digests = dict[tuple[str, str], tuple[tuple[str, str], ...]]
_HEX64 = re.compile(r"[0-9a-f]{64}")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _value_digest(value: str) -> str | None:
    if value.startswith("sha256:"):
        hexdigest = value.removeprefix("sha256:").lower()
        return hexdigest if _HEX64.fullmatch(hexdigest) else None
    return digest(value) if value else None


def _secret(doc: Any, where: str, problems: list[str]) -> tuple[tuple[str, str], list[Any]] | None:
    if not isinstance(doc, dict) or doc.get("kind") != "Secret":
        return None  # not a Secret: not ours to judge
    meta = doc.get("metadata") or {}
    name, namespace = meta.get("name"), meta.get("namespace", "default")
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        problems.append(f"{where}: metadata.name and metadata.namespace must be strings")
        return None
    entries: list[Any] = []
    for client, value in (doc.get("stringData") or {}).items():
        entries.append((str(client), value if isinstance(value, str) else None, "stringData"))
    for client, value in (doc.get("data") or {}).items():
        try:
            text = base64.b64decode(str(value), validate=True).decode().strip()
        except (binascii.Error, UnicodeDecodeError):
            text = None
        entries.append((str(client), text, "data"))
    return (namespace, name), entries


def load(paths: Iterable[str | Path]) -> tuple[Digests, list[str]]:
    """Every Secret under ``paths`` (files or folders of ``*.yaml``/``*.yml``) → digests,
    and the problems found (each with its file; no value is ever quoted)."""
    out: Digests = {}
    problems: list[str] = []
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml"))
        elif path.exists():
            files.append(path)
    from controlplane.api.limits import MAX_KEYS_PER_SECRET, file_too_large

    for file in files:
        try:
            too_large = file_too_large(file.stat().st_size)
            if too_large is not None:
                problems.append(f"{file}: {too_large}")
                continue
            docs = list(yaml.safe_load_all(file.read_text()))
        except (OSError, yaml.YAMLError) as err:
            problems.append(f"{file}: cannot read YAML ({type(err).__name__})")
            continue
        for index, doc in enumerate(docs):
            where = f"{file}[{index}]"
            found = _secret(doc, where, problems)
            if found is None:
                continue
            ref, entries = found
            if len(entries) > MAX_KEYS_PER_SECRET:
                problems.append(
                    f"{where} Secret {ref[0]}/{ref[1]}: stringData/data: {len(entries):,} keys, "
                    f"over the limit of {MAX_KEYS_PER_SECRET:,} per Secret"
                )
                continue
            keys = []
            for client, value, field in entries:
                hexdigest = _value_digest(value) if value is not None else None
                if hexdigest is None:
                    problems.append(
                        f"{where} Secret {ref[0]}/{ref[1]}: {field}.{client}: must be a "
                        "non-empty key or sha256:<64 hex digits>"
                    )
                    continue
                keys.append((client, hexdigest))
            if ref in out:
                problems.append(f"{where}: Secret {ref[0]}/{ref[1]} is defined twice")
                continue
            out[ref] = tuple(sorted(keys))
    return out, problems

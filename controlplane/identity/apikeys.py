"""API keys of callers outside the mesh, loaded as SHA-256 digests with their metadata.

Keys live in Kubernetes-style Secrets, so the same file works with ``kubectl apply``::

    apiVersion: v1
    kind: Secret
    metadata:
      name: partner-keys
      namespace: ml
      labels: {modelguard.io/api-keys: "true"}
      annotations:
        modelguard.io/tenant: acme          # every key's tenant, unless its entry says otherwise
        modelguard.io/tier: standard        # every key's tier (the hardening tier)
        modelguard.io/keys: |               # per key: tenant, tier, principals
          partner-b: {tier: premium}
          partner-c: {tenant: globex, principals: ["spiffe://cluster.local/ns/web/sa/app"]}
    stringData:
      partner-a: "the key itself"          # hashed on load, never kept in memory
      partner-b: "sha256:9f86d08188..."    # or only its digest
      partner-c: "sha256:..."

A key's *id* is its entry name (``partner-a``): the sidecar names a verified caller by it
(``x-modelguard-key-id``), with its tenant (``x-modelguard-tenant``, default: the key's
id, so a key without a tenant is a cohort of one) and tier (``x-modelguard-tier``, default:
none, the policy's default hardening). Metadata lives in annotations because a Secret's
values are the keys; everything here is also valid without annotations (the format before
tenants). ``principals`` binds a key to the JWT subjects (``sub``) or SPIFFE IDs that may
present it: a key sent beside a verified JWT or client certificate is refused unless that
principal is listed.

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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from controlplane.compile.inputs.mesh import ApiKey as ApiKey

log = logging.getLogger(__name__)

TENANT_ANNOTATION = "modelguard.io/tenant"
TIER_ANNOTATION = "modelguard.io/tier"
KEYS_ANNOTATION = "modelguard.io/keys"


Digests = dict[tuple[str, str], tuple[ApiKey, ...]]
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Ids, tenants and tiers go into headers and the sidecar's Lua table: Kubernetes' Secret
# key characters, which also keeps them apart from "addr:<ip>", the anonymous callers' id.
_NAME = re.compile(r"[-._a-zA-Z0-9]{1,253}")
_PRINCIPAL = re.compile(r"[!#-\[\]-~]{1,1024}")  # printable ASCII without " and \


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _value_digest(value: str) -> str | None:
    if value.startswith("sha256:"):
        hexdigest = value.removeprefix("sha256:").lower()
        return hexdigest if _HEX64.fullmatch(hexdigest) else None
    return digest(value) if value else None


def _metadata(
    annotations: Mapping[str, Any], where: str, problems: list[str]
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Secret-wide defaults and per-key entries from the annotations, each checked."""
    defaults: dict[str, str] = {}
    for field, annotation in (("tenant", TENANT_ANNOTATION), ("tier", TIER_ANNOTATION)):
        value = annotations.get(annotation)
        if value is None:
            continue
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            problems.append(
                f"{where}: metadata.annotations.{annotation}: must match {_NAME.pattern}"
            )
            continue
        defaults[field] = value
    per_key: dict[str, dict[str, Any]] = {}
    raw = annotations.get(KEYS_ANNOTATION)
    if raw is None:
        return defaults, per_key
    path = f"{where}: metadata.annotations.{KEYS_ANNOTATION}"
    try:
        parsed = yaml.safe_load(raw) if isinstance(raw, str) else None
    except yaml.YAMLError:
        parsed = None
    if not isinstance(parsed, dict):
        problems.append(f"{path}: must be YAML mapping key ids to {{tenant, tier, principals}}")
        return defaults, per_key
    for key_id, entry in parsed.items():
        at = f"{path}.{key_id}"
        if not isinstance(entry, dict) or set(entry) - {"tenant", "tier", "principals"}:
            problems.append(f"{at}: must be a mapping of tenant, tier and principals")
            continue
        ok = True
        for field in ("tenant", "tier"):
            value = entry.get(field)
            if value is not None and (not isinstance(value, str) or not _NAME.fullmatch(value)):
                problems.append(f"{at}.{field}: must match {_NAME.pattern}")
                ok = False
        principals = entry.get("principals", [])
        if isinstance(principals, str):
            principals = [principals]
        if not isinstance(principals, list) or not all(
            isinstance(p, str) and _PRINCIPAL.fullmatch(p) for p in principals
        ):
            problems.append(f"{at}.principals: must be a list of SPIFFE IDs or JWT subjects")
            ok = False
        if ok:
            per_key[str(key_id)] = {**entry, "principals": tuple(principals)}
    return defaults, per_key


def keys_of(
    values: Iterable[tuple[str, str | None, str]],
    annotations: Mapping[str, Any],
    where: str,
    problems: list[str],
) -> tuple[ApiKey, ...]:
    """A Secret's (id, value or None, field) entries and annotations → its keys, sorted.
    A problem names the Secret and entry, never a value; a bad entry is left out, and a
    Secret over ``MAX_KEYS_PER_SECRET`` keys is refused whole (files and cluster alike)."""
    from controlplane.api.limits import MAX_KEYS_PER_SECRET

    values = list(values)
    if len(values) > MAX_KEYS_PER_SECRET:
        problems.append(
            f"{where}: stringData/data: {len(values):,} keys, "
            f"over the limit of {MAX_KEYS_PER_SECRET:,} per Secret"
        )
        return ()
    defaults, per_key = _metadata(annotations, where, problems)
    keys = []
    seen = set()
    for key_id, value, field in values:
        hexdigest = _value_digest(value) if value is not None else None
        if hexdigest is None:
            problems.append(
                f"{where}: {field}.{key_id}: must be a non-empty key or sha256:<64 hex digits>"
            )
            continue
        if not _NAME.fullmatch(key_id):
            problems.append(f"{where}: {field}.{key_id}: a key id must match {_NAME.pattern}")
            continue
        meta = per_key.get(key_id, {})
        seen.add(key_id)
        keys.append(
            ApiKey(
                id=key_id,
                digest=hexdigest,
                tenant=meta.get("tenant") or defaults.get("tenant") or key_id,
                tier=meta.get("tier") or defaults.get("tier", ""),
                principals=tuple(meta.get("principals", ())),
            )
        )
    for key_id in sorted(set(per_key) - seen):
        problems.append(f"{where}: metadata.annotations.{KEYS_ANNOTATION}.{key_id}: no such key")
    return tuple(sorted(keys))


def _secret(
    doc: Any, where: str, problems: list[str]
) -> tuple[tuple[str, str], list[Any], Mapping[str, Any]] | None:
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
    annotations = meta.get("annotations") or {}
    return (namespace, name), entries, annotations if isinstance(annotations, dict) else {}


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
    from controlplane.api.limits import file_too_large

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
            ref, entries, annotations = found
            keys = keys_of(entries, annotations, f"{where} Secret {ref[0]}/{ref[1]}", problems)
            if ref in out:
                problems.append(f"{where}: Secret {ref[0]}/{ref[1]} is defined twice")
                continue
            out[ref] = keys
    return out, problems

"""Size limits on what a policy source may hand the control plane.

A policy file is read, parsed and validated whole, and everything it holds ends up in
every targeted sidecar's configuration. Without bounds one careless (or hostile) file —
the red team's was 50 MB with 331,000 rules — stalls the control plane for minutes and
keeps gigabytes after it is gone. The limits sit far above any real policy set (the
examples in ``policies/`` are under 2 KB with a handful of rules each) and are checked
before anything expensive: a file's size before it is read, a list's length before
pydantic builds a model per item.
"""

from __future__ import annotations

from collections.abc import Mapping

MAX_POLICY_FILE_BYTES = 4 * 1024 * 1024  # one policy file (a YAML stream of documents)
MAX_RULES_PER_POLICY = 1_000  # entries of one policy's rule list (each kind's RULE_LIST)
MAX_KEYS_PER_SECRET = 10_000  # API keys in one Secret


def file_too_large(size: int) -> str | None:
    if size <= MAX_POLICY_FILE_BYTES:
        return None
    return (
        f"file is {size:,} bytes, over the limit of {MAX_POLICY_FILE_BYTES:,}: not read "
        "(split it into several files)"
    )


def too_many_rules(doc: object, rule_lists: Mapping[str, str | None]) -> tuple[str, str] | None:
    """(field path, message) when a document's rule list (``rule_lists``: by kind) is over
    the limit."""
    if not isinstance(doc, dict):
        return None
    field = rule_lists.get(str(doc.get("kind")))
    spec = doc.get("spec")
    if field is None or not isinstance(spec, dict):
        return None
    items = spec.get(field)
    if isinstance(items, list) and len(items) > MAX_RULES_PER_POLICY:
        return (
            f"spec.{field}",
            f"{len(items):,} entries, over the limit of {MAX_RULES_PER_POLICY:,} per policy",
        )
    return None

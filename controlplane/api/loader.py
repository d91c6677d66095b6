"""From YAML text and files to validated policies, and every violation found on the way.

Nothing stops at the first problem: each document is checked whole, every document of a
stream is checked, and cross-document rules run over everything that parsed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from controlplane.api.base import API_VERSION, Metadata, Model
from controlplane.api.kinds import KINDS, RULE_LISTS, Policy
from controlplane.api.limits import file_too_large, too_many_rules
from controlplane.api.violations import Violation, from_validation_error
from controlplane.policies.extraction.api import ExtractionPolicy, resolve_reference

SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    source: str
    index: int  # document index in the source's YAML stream


class _Loader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys instead of silently keeping the last
    (a repeated ``spec:`` would otherwise drop half a policy without a word)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[str] = []


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Any:
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = (key_node.tag, key_node.value)
        if key in seen:
            mark = key_node.start_mark
            loader.duplicate_keys.append(
                f'duplicate key "{key_node.value}" (line {mark.line + 1}, column {mark.column + 1})'
            )
        seen.add(key)
    return loader.construct_yaml_map(node)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _yaml_message(err: Exception) -> str:
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        problem = err.problem or err.context or "syntax error"
        return f"invalid YAML: {problem} (line {mark.line + 1}, column {mark.column + 1})"
    return "invalid YAML: " + " ".join(str(err).split())


class _Envelope(Model):
    """What can still be checked in a document whose kind is unknown."""

    api_version: Any = None
    kind: Any = None
    metadata: Metadata
    spec: dict[str, Any]
    status: Any = None


def _subject(doc: Any) -> tuple[str | None, str | None]:
    """``(kind, namespace/name)`` of a document, as far as it can be read."""
    if not isinstance(doc, dict):
        return None, None
    kind = doc.get("kind")
    meta = doc.get("metadata")
    name = None
    if isinstance(meta, dict) and isinstance(meta.get("name"), str):
        namespace = meta.get("namespace")
        name = f"{namespace if isinstance(namespace, str) else 'default'}/{meta['name']}"
    return (kind if isinstance(kind, str) else None), name


def validate_document(
    doc: Any, source: str, index: int
) -> tuple[LoadedPolicy | None, list[Violation]]:
    """One parsed YAML document → a policy, or every violation that keeps it from being one."""
    if not isinstance(doc, dict):
        message = "must be a mapping with apiVersion, kind, metadata and spec"
        return None, [Violation(source, index, None, None, "", message)]
    kind, name = _subject(doc)

    def violation(path: str, message: str) -> Violation:
        return Violation(source, index, kind, name, path, message)

    over = too_many_rules(doc, RULE_LISTS)
    if over is not None:  # before pydantic builds a model per rule
        return None, [violation(*over)]
    found = []
    if doc.get("apiVersion") != API_VERSION:
        found.append(violation("apiVersion", f"must be {API_VERSION}"))
    policy: Policy | None = None
    try:
        if kind in KINDS:
            policy = KINDS[kind].model_validate(doc)
        else:
            found.append(violation("kind", f"must be one of {', '.join(KINDS)}"))
            _Envelope.model_validate(doc)  # for what can still be said
    except ValidationError as err:
        found.extend(
            violation(path, message)
            for path, message in from_validation_error(err)
            if path not in ("apiVersion", "kind")  # reported above, in the user's terms
        )
    if found or policy is None:
        return None, found
    if isinstance(policy, ExtractionPolicy):  # its reference file is read and checked here
        policy, problems = resolve_reference(policy, source)
        if problems:
            return None, [violation(path, message) for path, message in problems]
    return LoadedPolicy(policy, source, index), []


def parse_documents(text: str, source: str) -> tuple[list[LoadedPolicy], list[Violation]]:
    """Every policy in one YAML stream (``---``-separated); empty documents are skipped.

    A syntax error ends the stream (what follows cannot be trusted), but everything
    before it is still checked.
    """
    loaded: list[LoadedPolicy] = []
    violations: list[Violation] = []
    try:
        loader = _Loader(text)  # the reader already refuses unprintable characters
    except yaml.YAMLError as err:
        return [], [Violation(source, 0, None, None, "", _yaml_message(err))]
    index = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            try:
                doc = loader.construct_document(node) if node is not None else None
            except (yaml.YAMLError, ValueError) as err:  # e.g. an impossible date
                violations.append(Violation(source, index, None, None, "", _yaml_message(err)))
                loader.constructed_objects = {}
                loader.recursive_objects = {}
                loader.duplicate_keys = []
                index += 1
                continue
            duplicates, loader.duplicate_keys = loader.duplicate_keys, []
            if doc is not None:
                policy, found = validate_document(doc, source, index)
                kind, name = _subject(doc)
                violations.extend(Violation(source, index, kind, name, "", d) for d in duplicates)
                violations.extend(found)
                if policy is not None and not duplicates:
                    loaded.append(policy)
            index += 1
    except yaml.YAMLError as err:
        violations.append(Violation(source, index, None, None, "", _yaml_message(err)))
    finally:
        loader.dispose()
    return loaded, violations


def validate_cross(loaded: list[LoadedPolicy]) -> list[Violation]:
    """Rules across documents: one object per kind, namespace and name."""
    first: dict[tuple[str, str, str], LoadedPolicy] = {}
    violations = []
    for item in loaded:
        ref = item.policy.ref
        if ref in first:
            kind, namespace, name = ref
            earlier = first[ref]
            violations.append(
                Violation(
                    item.source,
                    item.index,
                    kind,
                    f"{namespace}/{name}",
                    "metadata.name",
                    f"duplicate {kind} {namespace}/{name}, first defined in "
                    f"{earlier.source}[{earlier.index}]",
                )
            )
        else:
            first[ref] = item
    return violations


def policy_files(root: Path) -> list[Path]:
    # Hidden entries are skipped: editors' swap files, and the `..data` links of a
    # Kubernetes ConfigMap mount, which would load every file twice.
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix in SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def load_paths(paths: Sequence[str | Path]) -> tuple[list[LoadedPolicy], list[Violation]]:
    """Every policy in these files and directories (``*.yaml``/``*.yml``, recursively, in
    sorted order), then the cross-document checks. Only valid documents are returned: a
    duplicate is reported on, and dropped from, the later document."""
    loaded: list[LoadedPolicy] = []
    violations: list[Violation] = []
    seen: set[Path] = set()
    for given in paths:
        root = Path(given)
        if root.is_dir():
            files = policy_files(root)
        elif root.is_file():
            files = [root]
        else:
            violations.append(
                Violation(str(root), None, None, None, "", "no such file or directory")
            )
            continue
        for path in files:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                too_large = file_too_large(path.stat().st_size)
                if too_large is not None:
                    violations.append(Violation(str(path), None, None, None, "", too_large))
                    continue
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                violations.append(Violation(str(path), None, None, None, "", "not UTF-8 text"))
                continue
            except OSError as err:
                message = f"cannot read: {err.strerror or err}"
                violations.append(Violation(str(path), None, None, None, "", message))
                continue
            found, bad = parse_documents(text, str(path))
            loaded.extend(found)
            violations.extend(bad)
    # The first file in sorted order wins, whatever order the paths were given in: the
    # same winner the policy store (the watcher) picks.
    loaded.sort(key=lambda lp: (lp.source, lp.index))
    cross = validate_cross(loaded)
    rejected = {(v.source, v.index) for v in cross}
    return [p for p in loaded if (p.source, p.index) not in rejected], violations + cross


def is_empty_policy_text(text: str) -> bool:
    """No YAML document with content: nothing but blank lines, comments and ``---``."""
    try:
        return all(doc is None for doc in yaml.safe_load_all(text))
    except yaml.YAMLError:
        return False  # a syntax error is reported as a violation, not as emptiness


def empty_policy_files(paths: Sequence[str | Path]) -> list[str]:
    """The policy files among ``paths`` that hold no policy at all (worth a warning: an
    empty file is more often a mistake than an intent)."""
    out = []
    for given in paths:
        root = Path(given)
        files = policy_files(root) if root.is_dir() else [root] if root.is_file() else []
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # reported as a violation by load_paths
            if is_empty_policy_text(text):
                out.append(str(path))
    return out

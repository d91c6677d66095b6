"""The CRDs in k8s/crds/ are generated, structural, and agree with the pydantic models.

Without an API server, a CRD's schema is checked the two ways the server would use it:
the OpenAPI part with jsonschema, the ``x-kubernetes-validations`` with a CEL interpreter
(cel-python).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from controlplane import crdgen
from controlplane.api import KINDS, validate_document

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33.0"

# What a structural schema may say (apiextensions.k8s.io/v1 JSONSchemaProps, minus the
# constructs Kubernetes refuses: $ref, unions, additionalProperties: false beside properties).
ALLOWED = {
    "type",
    "x-kubernetes-int-or-string",  # structural without a type (Kubernetes' own exception)
    "format",
    "description",
    "enum",
    "default",
    "required",
    "properties",
    "items",
    "additionalProperties",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


def crd_of(kind: str) -> dict[str, Any]:
    path = REPO / "k8s" / "crds" / f"{crdgen.NAMES[kind].plural}.yaml"
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def schema_of(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = crd_of(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def schema_errors(kind: str, obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema_of(kind))
    return sorted(
        ".".join(str(p) for p in e.absolute_path) + ": " + e.message
        for e in validator.iter_errors(obj)
    )


_CEL = celpy.Environment()


def cel_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Every failing x-kubernetes-validations rule under ``schema`` for ``value``."""
    out = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = _CEL.program(_CEL.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            out.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in value.items():
            if key in schema.get("properties", {}):
                out += cel_errors(schema["properties"][key], sub, f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                out += cel_errors(schema["additionalProperties"], sub, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += cel_errors(schema["items"], item, f"{path}[{i}]")
    return out


def example_policies() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted((REPO / "policies").glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((f"{path.name}[{i}]", doc))
    return out


def test_committed_crds_are_generated_from_the_api() -> None:
    stale = crdgen.stale()
    assert not stale, f"k8s/crds/ is stale ({', '.join(stale)}): run `make crds`"


def test_demo_policies_are_copies_of_the_examples() -> None:
    stale = crdgen.stale(crdgen.DEMO_POLICIES_DIR, crdgen.demo_policies())
    assert not stale, f"k8s/demo/policies/ is stale ({', '.join(stale)}): run `make crds`"


def test_check_mode_fails_on_a_stale_directory(tmp_path: Path) -> None:
    crds, demo = tmp_path / "crds", tmp_path / "demo"
    argv = ["--out", str(crds), "--demo-out", str(demo)]
    assert crdgen.main(argv) == 0
    assert crdgen.main(["--check", *argv]) == 0
    path = crds / "ratepolicies.yaml"
    path.write_text(path.read_text().replace("minItems: 1", "minItems: 2"))
    (crds / "oldpolicies.yaml").write_text("{}\n")
    assert crdgen.stale(crds) == ["ratepolicies.yaml", "oldpolicies.yaml"]
    assert crdgen.main(["--check", *argv]) == 1
    assert crdgen.main(argv) == 0
    assert crdgen.stale(crds) == []
    (demo / "rate.yaml").write_text("changed\n")
    assert crdgen.main(["--check", *argv]) == 1


def test_per_kind_lines_outside_the_kind_folders_are_generated() -> None:
    stale = [str(p) for p, text in crdgen.spliced().items() if p.read_text() != text]
    assert not stale, f"per-kind lines are stale ({', '.join(stale)}): run `make crds`"


def test_check_mode_fails_when_the_per_kind_lines_are_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rbac = crdgen.RBAC.read_text()
    # A kind dropped from the generated lines, as if it had been registered since.
    assert "egresspolicies, " in rbac
    edited = rbac.replace("egresspolicies, ", "")
    assert crdgen.splice(edited, crdgen.rbac_rules()) == rbac
    assert crdgen.splice(rbac, crdgen.rbac_rules()) == rbac
    with pytest.raises(crdgen.SpliceError, match="markers"):
        crdgen.splice(rbac.replace(crdgen.BEGIN, ""), crdgen.rbac_rules(), "rbac.yaml")
    # And `--check` (make gen-check) exits 1 on a stale copy, 0 once regenerated.
    copy = tmp_path / "control-plane" / "rbac.yaml"
    copy.parent.mkdir()
    copy.write_text(edited)
    monkeypatch.setattr(crdgen, "REPO", tmp_path)
    monkeypatch.setattr(crdgen, "RBAC", copy)
    assert crdgen.main(["--check"]) == 1
    copy.write_text(rbac)
    assert crdgen.main(["--check"]) == 0


def test_one_crd_per_kind_with_status_columns_and_short_names() -> None:
    for kind in KINDS:
        crd = crd_of(kind)
        names = crd["spec"]["names"]
        assert crd["metadata"]["name"] == f"{names['plural']}.modelguard.io"
        assert names["kind"] == kind and names["categories"] == ["modelguard"]
        assert names["shortNames"] and all(s.startswith("mg") for s in names["shortNames"])
        version = crd["spec"]["versions"][0]
        assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
        columns = [c["name"] for c in version["additionalPrinterColumns"]]
        assert columns[:1] == ["Target"] and columns[-4:] == [
            "Accepted",
            "Programmed",
            "Sidecars",
            "Age",
        ]
        conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        assert conditions["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def _walk(schema: dict[str, Any], path: str) -> list[str]:
    problems = [f"{path}: {key}" for key in schema if key not in ALLOWED]
    if "type" not in schema and not schema.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: properties and additionalProperties")
    if schema.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false")
    for key, sub in schema.get("properties", {}).items():
        problems += _walk(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            problems += _walk(schema[key], f"{path}.{key}")
    return problems


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_schemas_are_structural(kind: str) -> None:
    assert _walk(schema_of(kind), kind) == []


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crds_validate_as_kubernetes_objects(kind: str) -> None:
    kubernetes_validate.validate(crd_of(kind), K8S_VERSION, strict=True)


@pytest.mark.parametrize(("where", "doc"), example_policies(), ids=lambda v: str(v)[:20])
def test_example_policies_validate_against_their_crd(where: str, doc: dict[str, Any]) -> None:
    kind = doc["kind"]
    assert schema_errors(kind, doc) == [], where
    assert cel_errors(schema_of(kind), doc) == [], where


def _base(kind: str) -> dict[str, Any]:
    return next(doc for _, doc in example_policies() if doc["kind"] == kind)


def _with(kind: str, path: str, value: Any) -> dict[str, Any]:
    doc = yaml.safe_load(yaml.safe_dump(_base(kind)))
    *parents, last = path.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()

# Invalid objects: the CRD must reject each one, and so must the pydantic models.
INVALID = [
    (
        "AccessPolicy",
        "spec.targetRef",
        {"service": "a", "selector": {"matchLabels": {}}},
        "cel",
        ".spec.targetRef: exactly one of service, selector must be set",
    ),
    (
        "AccessPolicy",
        "spec.targetRef",
        {},
        "cel",
        ".spec.targetRef: exactly one of service, selector must be set",
    ),
    (
        "AccessPolicy",
        "spec.rules.0.to",
        {},
        "cel",
        ".spec.rules[0].to: must set at least one of methods, paths",
    ),
    (
        "AccessPolicy",
        "spec.rules.0.from",
        {"namespaces": []},
        "cel",
        ".spec.rules[0].from: must set at least one of identities, namespaces, apiKeys, jwt",
    ),
    ("AccessPolicy", "spec.rules.0.action", "Maybe", "schema", "spec.rules.0.action"),
    ("AccessPolicy", "spec.rules.0.name", "Not_A_Label", "schema", "spec.rules.0.name"),
    ("RatePolicy", "spec.limits.0.burst", 5, "cel", ".spec.limits[0].burst: must be at least"),
    (
        "RatePolicy",
        "spec.limits.0.clientKey",
        {"header": "x", "sourceIP": True},
        "cel",
        ".spec.limits[0].clientKey: exactly one of apiKey, header, identity, jwtClaim, sourceIP",
    ),
    ("RatePolicy", "spec.limits.0.per", "week", "schema", "spec.limits.0.per"),
    ("RatePolicy", "spec.limits.0.requests", 0, "schema", "spec.limits.0.requests"),
    ("RatePolicy", "spec.limits", [], "schema", "spec.limits"),
    ("RatePolicy", "spec.limits.0.surprise", 1, "schema", "spec.limits.0"),
    (
        "ExtractionPolicy",
        "spec.output.labelOnly",
        True,
        "cel",
        ".spec.output.labelOnly: labelOnly returns no scores",
    ),
    (
        "ExtractionPolicy",
        "spec.output",
        {"topK": 1, "tierHeader": "x-tier"},  # the example's output has tiers
        "cel",
        ".spec.output.tiers: required when tierHeader is set",
    ),
    (
        "ExtractionPolicy",
        "spec.output",
        {"tierHeader": "x-tier", "tiers": {"Gold": {}}},
        "cel",
        ".spec.output.tiers: keys must match",
    ),
    ("ExtractionPolicy", "spec.detection", _DELETE, "cel", ".spec.actions: requires detection"),
    ("ExtractionPolicy", "spec.request.features", "instances", "schema", "spec.request.features"),
    ("EgressPolicy", "spec.allow.0.ports", [0], "schema", "spec.allow.0.ports.0"),
    ("EgressPolicy", "spec.allow.0.host", "Bad Host", "schema", "spec.allow.0.host"),
]


@pytest.mark.parametrize(("kind", "path", "value", "by", "expected"), INVALID)
def test_invalid_objects_are_rejected_by_the_crd_and_the_models(
    kind: str, path: str, value: Any, by: str, expected: str
) -> None:
    doc = _with(kind, path, value)
    # Unknown fields are refused by pydantic and by the API server's strict field
    # validation; jsonschema needs to be told that the CRD prunes them.
    schema_found = schema_errors(kind, doc)
    if path.endswith("surprise"):
        assert (
            "surprise"
            not in schema_of(kind)["properties"]["spec"]["properties"]["limits"]["items"][
                "properties"
            ]
        )
    else:
        found = schema_found if by == "schema" else cel_errors(schema_of(kind), doc)
        assert any(f.startswith(expected) for f in found), found
    _, violations = validate_document(doc, "test", 0)
    assert violations, f"pydantic accepted what the CRD rejects: {path}={value!r}"

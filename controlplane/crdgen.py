"""CustomResourceDefinitions for the policy kinds, generated from ``controlplane/api``.

The pydantic models are the one source of truth. Their JSON Schema is turned into a
*structural* OpenAPI v3 schema as Kubernetes requires it: every ``$ref`` inlined, optional
fields as plain (non-required) properties instead of ``anyOf`` with ``null``, no
``additionalProperties: false`` (the API server prunes and, with field validation, rejects
unknown fields), and OpenAPI 3.0's spelling of exclusive bounds. Rules pydantic checks in
code (exactly one of, at least one of, cross-field bounds) become CEL
``x-kubernetes-validations`` so ``kubectl apply`` rejects what ``modelguard validate`` would.

``python -m controlplane.crdgen`` writes ``k8s/crds/`` (and the demo's copies of
``policies/``); ``--check`` exits 1 when they are stale (``make crds`` / ``make gen-check``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Final

import yaml

from controlplane.api import API_VERSION, KINDS
from controlplane.api.crd import SHARED, Names, Rule, rule
from controlplane.policies.registry import REGISTRY

GROUP, VERSION = API_VERSION.split("/")
CATEGORY: Final = "modelguard"
REPO: Final = Path(__file__).resolve().parent.parent
CRD_DIR: Final = REPO / "k8s" / "crds"
# kustomize refuses files outside a kustomization's folder (symlinks included), so the demo
# carries generated copies of the example policies.
POLICIES_DIR: Final = REPO / "policies"
DEMO_POLICIES_DIR: Final = REPO / "k8s" / "demo" / "policies"


class CrdGenError(ValueError):
    """A model uses a schema construct that has no structural OpenAPI equivalent."""


# Every kind's names and CEL rules come from its folder (controlplane/policies/<kind>/crd.py)
# through the registry; the shared models' rules from controlplane/api/crd.py.
NAMES: Final[dict[str, Names]] = {kind.name: kind.crd.names for kind in REGISTRY}


def _merged_validations() -> dict[str, list[Rule]]:
    out: dict[str, list[Rule]] = {name: list(rules) for name, rules in SHARED.items()}
    for kind in REGISTRY:
        for name, rules in kind.crd.validations.items():
            if name in out:
                raise CrdGenError(f"{kind.name}: CEL rules of {name} are declared twice")
            out[name] = list(rules)
    return out


# The model validators of controlplane/api, as CEL, keyed by model (JSON Schema def) name.
# Each says the same as the Python rule, with the same message where the path allows it.
VALIDATIONS: Final[dict[str, list[Rule]]] = _merged_validations()

# Lists whose items the API server can keep unique by itself (pydantic rejects duplicates
# there too). Rules' names are optional, so AccessPolicy rules cannot be a map.
LIST_TYPES: Final[dict[tuple[str, str], dict[str, Any]]] = {
    key: value for kind in REGISTRY for key, value in kind.crd.list_types.items()
}

# metav1.Condition, as every Kubernetes API that reports conditions has it.
CONDITION_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["type", "status", "lastTransitionTime", "reason", "message"],
    "properties": {
        "type": {"type": "string", "maxLength": 316},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
        "reason": {"type": "string", "maxLength": 1024, "minLength": 1},
        "message": {"type": "string", "maxLength": 32768},
    },
}

STATUS_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "description": "Written by the control plane: Accepted (valid; else every violation), "
    "Programmed (the targeted sidecars ACKed the configuration).",
    "properties": {
        "observedGeneration": {"type": "integer", "format": "int64"},
        "targetedSidecars": {"type": "integer", "format": "int32"},
        "programmedSidecars": {"type": "integer", "format": "int32"},
        "conditions": {
            "type": "array",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
            "items": CONDITION_SCHEMA,
        },
    },
}

_DROP = {"title", "$defs"}
# Reads like hand-written CRDs: what a node is first, its children last.
_KEY_ORDER = {
    key: i for i, key in enumerate(("description", "type", "format", "enum", "default", "required"))
} | {"properties": 90, "items": 91, "additionalProperties": 92}


def _def_name(ref: str) -> str:
    prefix = "#/$defs/"
    if not ref.startswith(prefix):
        raise CrdGenError(f"unsupported $ref {ref!r}")
    return ref[len(prefix) :]


class _Converter:
    def __init__(self, defs: dict[str, Any]) -> None:
        self.defs = defs

    @staticmethod
    def _map_keys(node: dict[str, Any], path: str) -> list[dict[str, str]]:
        """A map with constrained keys (``dict[DnsLabel, X]``): pydantic says so with
        patternProperties/propertyNames, which are not structural; the value schema moves to
        additionalProperties (in ``node``) and the key constraints become CEL."""
        patterns = node.pop("patternProperties", None)
        names = node.pop("propertyNames", {})
        checks, said = [], []
        if patterns is not None:
            if len(patterns) != 1:
                raise CrdGenError(f"{path}: several key patterns are not structural")
            ((pattern, value),) = patterns.items()
            node["additionalProperties"] = value
            checks.append(f"k.matches('{pattern}')")
            said.append(f"match {pattern}")
        if "maxLength" in names:
            checks.append(f"size(k) <= {names['maxLength']}")
            said.append(f"have at most {names['maxLength']} characters")
        if not checks:
            return []
        return [rule(f"self.all(k, {' && '.join(checks)})", f"keys must {' and '.join(said)}")]

    def convert(self, node: dict[str, Any], path: str, name: str | None = None) -> dict[str, Any]:
        node = dict(node)
        if "$ref" in node:
            name = _def_name(node.pop("$ref"))
            if name == "Metadata":
                # The API server owns ObjectMeta's schema; a CRD may only say "object".
                return {"type": "object"}
            node = {**self.defs[name], **node}
            return self.convert(node, path, name)
        if "anyOf" in node:
            options = [o for o in node.pop("anyOf") if o != {"type": "null"}]
            if sorted(str(o.get("type")) for o in options) == ["integer", "string"]:
                return {"x-kubernetes-int-or-string": True}  # e.g. a column: name or index
            if len(options) != 1:
                raise CrdGenError(f"{path}: a union of several types is not structural")
            return self.convert({**options[0], **node}, path, name)
        out: dict[str, Any] = {}
        key_rules = self._map_keys(node, path)
        for key, value in node.items():
            if key in _DROP or (key == "additionalProperties" and value is False):
                continue
            if key == "default" and value in (None, [], {}):
                continue  # an empty default only adds noise to every stored object
            if key == "const":
                out["enum"] = [value]
            elif key in ("exclusiveMinimum", "exclusiveMaximum"):
                if node.get("type") != "integer":
                    raise CrdGenError(f"{path}: exclusive bounds are only supported on integers")
                out["minimum" if key == "exclusiveMinimum" else "maximum"] = (
                    value + 1 if key == "exclusiveMinimum" else value - 1
                )
            elif key == "properties":
                out[key] = {
                    prop: self.convert(sub, f"{path}.{prop}")
                    | LIST_TYPES.get((name or "", prop), {})
                    for prop, sub in value.items()
                }
            elif key == "items":
                out[key] = self.convert(value, f"{path}[]")
            elif key == "additionalProperties":
                out[key] = self.convert(value, f"{path}[*]")
            elif key == "description":
                out[key] = " ".join(str(value).split())
            else:
                out[key] = value
        rules = key_rules + VALIDATIONS.get(name or "", [])
        if rules:
            out["x-kubernetes-validations"] = rules
        return dict(sorted(out.items(), key=lambda item: _KEY_ORDER.get(item[0], len(_KEY_ORDER))))


def spec_schema(kind: str) -> dict[str, Any]:
    """The structural schema of ``spec`` of one kind."""
    schema = KINDS[kind].model_json_schema(by_alias=True, mode="validation")
    converter = _Converter(schema.get("$defs", {}))
    return converter.convert(schema["properties"]["spec"], "spec")


def _columns(kind: str) -> list[dict[str, Any]]:
    def condition(kind_: str) -> str:
        return f'.status.conditions[?(@.type=="{kind_}")].status'

    columns: list[dict[str, Any]] = [
        {"name": "Target", "type": "string", "jsonPath": ".spec.targetRef.service"},
    ]
    if "mode" in spec_schema(kind)["properties"]:
        columns.append({"name": "Mode", "type": "string", "jsonPath": ".spec.mode"})
    columns += [
        {"name": "Accepted", "type": "string", "jsonPath": condition("Accepted")},
        {"name": "Programmed", "type": "string", "jsonPath": condition("Programmed")},
        {
            "name": "Sidecars",
            "type": "integer",
            "jsonPath": ".status.programmedSidecars",
            "description": "targeted sidecars that ACKed the current generation",
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return columns


def crd(kind: str) -> dict[str, Any]:
    names = NAMES[kind]
    description = " ".join((KINDS[kind].__doc__ or "").split()) or None
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(kind),
            "status": STATUS_SCHEMA,
        },
    }
    if description:
        schema["description"] = description
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{names.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "modelguard"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": names.plural,
                "singular": names.singular,
                "shortNames": list(names.short),
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _columns(kind),
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


HEADER = "# Generated by `make crds` (python -m controlplane.crdgen) from controlplane/api.\n"


def render(document: dict[str, Any]) -> str:
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


def generate() -> dict[str, str]:
    """File name → content of every file in ``k8s/crds/`` (kustomization included)."""
    files = {f"{NAMES[kind].plural}.yaml": render(crd(kind)) for kind in sorted(KINDS)}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": sorted(files),
    }
    files["kustomization.yaml"] = render(kustomization)
    return files


RBAC: Final = REPO / "k8s" / "control-plane" / "rbac.yaml"
PYPROJECT: Final = REPO / "pyproject.toml"
DEMO_KUSTOMIZATION: Final = REPO / "k8s" / "demo" / "kustomization.yaml"
BEGIN: Final = "# BEGIN generated by `make crds` from controlplane/policies/registry.py\n"
END: Final = "# END generated\n"


def rbac_rules() -> str:
    """The ClusterRole's rules for the policy kinds: read every kind, patch its status."""
    plurals = [kind.crd.names.plural for kind in REGISTRY]
    return (
        f"- apiGroups: [{GROUP}]\n  resources: [{', '.join(plurals)}]\n"
        "  verbs: [get, list, watch]\n"
        f"- apiGroups: [{GROUP}]\n  resources:\n"
        + "".join(f"  - {plural}/status\n" for plural in plurals)
        + "  verbs: [patch]\n"
    )


def demo_resources(source: Path = POLICIES_DIR) -> str:
    """The demo kustomization's lines for the kinds' examples (``policies/<folder>.yaml``)."""
    return "".join(
        f"- policies/{kind.folder}.yaml\n"
        for kind in sorted(REGISTRY, key=lambda k: k.folder)
        if (source / f"{kind.folder}.yaml").is_file()
    )


COMPILERS: Final = REPO / "controlplane" / "policies" / "compilers.py"
TRANSLATORS: Final = REPO / "controlplane" / "policies" / "translators.py"


def _module_table(what: str, layer: str, imports: list[str], value: str) -> str:
    names = [kind.folder for kind in REGISTRY]
    lines = [
        '"""Generated by `make crds` (python -m controlplane.crdgen) from the registry',
        f"(controlplane/policies/registry.py): every registered kind's {layer} module{what}.",
        'Edit the registry, not this file."""',
        "",
        "from __future__ import annotations",
        "",
        "from typing import Final",
        "",
        *sorted(imports + [f"from controlplane.policies.{n} import {layer} as {n}" for n in names]),
        "",
        value.format(
            "".join(f"    {n},\n" for n in names), "".join(f"    *{n}.MODULES,\n" for n in names)
        ),
    ]
    return "\n".join(lines) + "\n"


def generated_modules() -> dict[Path, str]:
    """The compile dispatch and the translate modules of every kind, in registry order."""
    return {
        COMPILERS: _module_table(
            "",
            "compile",
            ["from controlplane.compile.feature import FeatureCompiler"],
            "MODULES: Final[tuple[FeatureCompiler, ...]] = (\n{0})",
        ),
        TRANSLATORS: _module_table(
            "s (phase, module)",
            "translate",
            ["from controlplane.translate.module import Module"],
            "MODULES: Final[tuple[tuple[int, Module], ...]] = (\n{1})",
        ),
    }


class SpliceError(ValueError):
    """A hand-written file lost the markers of its generated lines."""


def splice(text: str, lines: str, where: str = "") -> str:
    """``text`` with the lines between each ``BEGIN`` and its ``END`` replaced by ``lines``."""
    out, rest = "", text
    while (start := rest.find(BEGIN)) >= 0:
        end = rest.find(END, start)
        if end < 0:
            break
        out += rest[: start + len(BEGIN)] + lines
        rest = rest[end:]
    if not out:
        raise SpliceError(f"{where}: the markers {BEGIN.strip()!r} ... {END.strip()!r} are missing")
    return out + rest


def kind_packages() -> str:
    """pyproject.toml's import contracts: every kind's folder, a container of its layers."""
    return "".join(f'  "controlplane.policies.{kind.folder}",\n' for kind in REGISTRY)


def spliced() -> dict[Path, str]:
    """Files with per-kind lines generated from the registry: path → wanted content.
    (The ClusterRole's and demo kustomization's lines between markers; the compile and
    translate tables of controlplane/policies/ whole.)"""
    out: dict[Path, str] = {}
    for path, lines in (
        (RBAC, rbac_rules()),
        (DEMO_KUSTOMIZATION, demo_resources()),
        (PYPROJECT, kind_packages()),
    ):
        out[path] = splice(path.read_text(), lines, str(path))
    return out | generated_modules()


# In the cluster a policy's reference data comes from a ConfigMap: the demo's copies name
# one (k8s/demo/kustomization.yaml generates it from the copied file) instead of a file.
_REFERENCE_FILE = re.compile(r"reference: \{file: ([-\w.]+)(, |\})")


def _cluster_reference(match: re.Match[str]) -> str:
    name = match.group(1)
    stem = name.rsplit(".", 1)[0]
    return f"reference: {{configMap: {{name: {stem}, key: {name}}}{match.group(2)}"


def demo_policies(source: Path = POLICIES_DIR) -> dict[str, str]:
    """File name → content of every file in ``k8s/demo/policies/`` (the reference data
    files the policies name are copied too)."""
    files = {
        path.name: f"# Copied from policies/{path.name} by `make crds`: edit that file.\n"
        + _REFERENCE_FILE.sub(_cluster_reference, path.read_text())
        for path in sorted(source.glob("*.yaml"))
    }
    for path in sorted(source.glob("*.csv")):
        files[path.name] = path.read_text()
    return files


def stale(directory: Path = CRD_DIR, wanted: dict[str, str] | None = None) -> list[str]:
    """Files of ``directory`` that differ from what the generator produces (or are extra)."""
    wanted = generate() if wanted is None else wanted
    out = [
        name
        for name, text in wanted.items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]
    if directory.is_dir():
        out += sorted(p.name for p in directory.glob("*.yaml") if p.name not in wanted)
    return out


def write(directory: Path = CRD_DIR, wanted: dict[str, str] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    wanted = generate() if wanted is None else wanted
    for path in directory.glob("*.yaml"):
        if path.name not in wanted:
            path.unlink()  # a kind that was removed leaves no orphan CRD behind
    for name, text in wanted.items():
        (directory / name).write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane.crdgen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if k8s/crds/ is stale")
    parser.add_argument("--out", type=Path, default=CRD_DIR)
    parser.add_argument("--demo-out", type=Path, default=DEMO_POLICIES_DIR)
    args = parser.parse_args(argv)
    outputs = ((args.out, generate()), (args.demo_out, demo_policies()))
    if args.check:
        bad = [
            f"{directory}/{name}"
            for directory, wanted in outputs
            for name in stale(directory, wanted)
        ]
        bad += [
            str(path)
            for path, text in spliced().items()
            if not path.is_file() or path.read_text() != text
        ]
        if bad:
            print(f"stale generated files: {', '.join(bad)}; run `make crds`", file=sys.stderr)
            return 1
        return 0
    for directory, wanted in outputs:
        write(directory, wanted)
    for path, text in spliced().items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

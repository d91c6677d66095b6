"""A new policy kind is one folder and one registration in controlplane/policies/registry.py.

The sample kind (tests/testdata/sample_kind/tag/, TagPolicy: response headers) is dropped
into a copy of the package and registered; `make crds` (python -m controlplane.crdgen)
regenerates everything else per kind. The test then lists every file that changed outside
the kind's folder: the registry (hand-edited) and the generated files, nothing more, and
checks that the kind works end to end: the loader validates it with field paths, its CRD
carries its CEL rule, the ClusterRole lets the control plane read it and write its status,
compile puts its feature in the IR and translate puts its headers on the inbound routes.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "testdata" / "sample_kind"

# The registration: the kind's modules imported, its entry in REGISTRY, and its model in the
# static type union (for mypy; nothing at run time reads the union).
IMPORTS = (
    "from controlplane.policies.tag import api as tag\n"
    "from controlplane.policies.tag import crd as tag_crd\n"
)
ENTRY = "    Kind(tag.TagPolicy, tag_crd.EXTRAS),\n"

# Every file with per-kind lines outside the kind's folder that `make crds` regenerates.
GENERATED = {
    "controlplane/policies/compilers.py",
    "controlplane/policies/translators.py",
    "k8s/crds/kustomization.yaml",
    "k8s/crds/tagpolicies.yaml",
    "k8s/control-plane/rbac.yaml",
    "pyproject.toml",
}

CHECK = r"""
import json, sys
from pathlib import Path

import yaml

from controlplane.api import KINDS, parse_documents
from controlplane.compile import compile_sidecar
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.translate import translate
from controlplane.xds import resources as rt

sample = Path(sys.argv[1])
good, violations = parse_documents((sample / "tag.yaml").read_text(), "tag.yaml")
bad_doc = (sample / "tag.yaml").read_text().replace("x-served-by", "served-by")
_, bad = parse_documents(bad_doc, "bad.yaml")
sidecar = Sidecar(
    node_id="digits-model-0", service="digits-model", namespace="demo",
    identity="spiffe://cluster.local/ns/demo/sa/digits-model", app_port=8080,
    inbound_port=15006,
)
ir = compile_sidecar(sidecar, [lp.policy for lp in good])
routes = translate(ir)[rt.ROUTE]
headers = [
    (h.header.key, h.header.value) for r in routes for h in r.response_headers_to_add
]
print(json.dumps({
    "kinds": sorted(KINDS),
    "violations": [str(v) for v in violations],
    "bad": [str(v) for v in bad],
    "features": [kind for kind, _ in ir.features],
    "headers": headers,
}))
"""


def _copy(tmp: Path) -> Path:
    repo = tmp / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    for part in ("controlplane", "k8s", "policies"):
        shutil.copytree(REPO / part, repo / part, ignore=ignore, symlinks=True)
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    return repo


def _changed(before: Path, after: Path) -> set[str]:
    out: set[str] = set()
    for path in after.rglob("*"):
        if path.is_symlink() or path.is_dir() or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(after)
        old = before / rel
        if not old.exists() or not filecmp.cmp(old, path, shallow=False):
            out.add(str(rel))
    return out


def _run(repo: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_a_sample_kind_is_one_folder_and_one_registration(tmp_path: Path) -> None:
    repo = _copy(tmp_path)
    pristine = tmp_path / "pristine"
    shutil.copytree(repo, pristine, symlinks=True)

    # The kind's folder ...
    shutil.copytree(SAMPLE / "tag", repo / "controlplane" / "policies" / "tag")
    # ... and its registration: the only hand edit outside the folder.
    registry = repo / "controlplane" / "policies" / "registry.py"
    text = registry.read_text()
    anchor = "\n\n@dataclass(frozen=True)\nclass Kind:"
    assert anchor in text and "\n)\n" in text
    text = text.replace(anchor, "\n" + IMPORTS.rstrip("\n") + anchor, 1)
    text = text.replace(
        "Policy = access.AccessPolicy", "Policy = tag.TagPolicy | access.AccessPolicy", 1
    )
    head, tail = text.rsplit("\n)\n", 1)
    registry.write_text(head + "\n" + ENTRY.rstrip("\n") + "\n)\n" + tail)

    # Before regenerating, the check fails: the generated files are stale.
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    stale = subprocess.run(
        [sys.executable, "-m", "controlplane.crdgen", "--check"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )
    assert stale.returncode == 1, stale.stdout + stale.stderr
    _run(repo, "-m", "controlplane.crdgen")
    _run(repo, "-m", "controlplane.crdgen", "--check")

    changed = _changed(pristine, repo)
    in_folder = {c for c in changed if c.startswith("controlplane/policies/tag/")}
    outside = changed - in_folder
    hand_edited = outside - GENERATED
    assert hand_edited == {"controlplane/policies/registry.py"}, sorted(outside)
    assert outside - hand_edited == GENERATED, sorted(outside)
    print(
        f"a new kind: {len(in_folder)} files in its folder, {len(hand_edited)} hand-edited file "
        f"outside it (registry.py), {len(GENERATED)} regenerated by make crds"
    )

    rbac = (repo / "k8s" / "control-plane" / "rbac.yaml").read_text()
    assert "tagpolicies" in rbac and "  - tagpolicies/status\n" in rbac
    crd = (repo / "k8s" / "crds" / "tagpolicies.yaml").read_text()
    assert "self.headers.all(k, k.startsWith('x-'))" in crd and "- mgtp" in crd
    assert "controlplane.policies.tag" in (repo / "pyproject.toml").read_text()

    # The import contracts cover the new folder too (its layers, its independence).
    lint = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )
    assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-2000:]

    out = json.loads(_run(repo, "-c", CHECK, str(SAMPLE)))
    assert "TagPolicy" in out["kinds"]
    assert out["violations"] == []
    assert out["bad"] and "spec.headers.served-by" in out["bad"][0], out["bad"]
    assert out["features"] == ["TagPolicy"]
    assert out["headers"] == [["x-served-by", "modelguard"]]

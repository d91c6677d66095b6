"""load_paths: files, directories, the shipped examples, and rules across documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.api import (
    AccessPolicy,
    EgressPolicy,
    ExtractionPolicy,
    RatePolicy,
    load_paths,
    parse_documents,
    validate_cross,
)

ROOT = Path(__file__).resolve().parents[2]
TREE = ROOT / "tests" / "testdata" / "api" / "tree"


def test_example_policies_are_valid() -> None:
    loaded, violations = load_paths([ROOT / "policies"])
    assert [str(v) for v in violations] == []
    kinds = {type(item.policy) for item in loaded}
    assert kinds == {AccessPolicy, EgressPolicy, RatePolicy, ExtractionPolicy}
    for item in loaded:
        assert item.policy.metadata.namespace == "demo"
        assert item.policy.spec.target_ref.service == "digits-model"


def test_example_access_policy_admits_only_registered_keys_to_predict() -> None:
    loaded, _ = load_paths([ROOT / "policies" / "access.yaml"])
    (item,) = loaded
    assert isinstance(item.policy, AccessPolicy)
    # Issue 14: predict only with a key of the demo Secret; health for anyone.
    froms = [r.from_ for r in item.policy.spec.rules]
    assert froms[0] is not None and froms[0].api_keys is not None
    assert froms[0].api_keys.secret_ref == "demo-keys" and froms[1] is None
    assert [(r.to.methods, r.to.paths) for r in item.policy.spec.rules if r.to] == [
        (["POST"], ["/v1/predict"]),
        (["GET"], ["/healthz"]),
    ]


def test_directory_tree_and_duplicates() -> None:
    loaded, violations = load_paths([TREE])
    a, b = TREE / "a.yaml", TREE / "nested" / "b.yml"
    # Sorted, recursive, *.yaml and *.yml only, hidden paths skipped.
    assert [(Path(item.source), item.index) for item in loaded] == [
        (a, 0),
        (a, 1),
        (b, 0),
        (b, 2),
    ]
    assert [str(v) for v in violations] == [
        f"{b}[1] RatePolicy ml/budget: metadata.name: duplicate RatePolicy ml/budget, "
        f"first defined in {a}[0]"
    ]


def test_files_given_twice_load_once() -> None:
    loaded, violations = load_paths([TREE / "a.yaml", TREE, TREE / "a.yaml"])
    assert violations[-1].path == "metadata.name"
    assert len(violations) == 1
    assert len(loaded) == 4


def test_missing_path() -> None:
    loaded, violations = load_paths(["does/not/exist.yaml"])
    assert loaded == []
    assert [str(v) for v in violations] == ["does/not/exist.yaml: no such file or directory"]


def test_unreadable_bytes(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(b"kind: \xff\xfe\n")
    _, violations = load_paths([tmp_path])
    assert [str(v) for v in violations] == [f"{tmp_path / 'bad.yaml'}: not UTF-8 text"]


def test_relative_sources_are_kept_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "rate.yaml").write_text("kind: RatePolicy\n")
    monkeypatch.chdir(tmp_path)
    _, violations = load_paths(["policies"])
    assert str(violations[0]).startswith("policies/rate.yaml[0] RatePolicy: apiVersion: ")


def test_validate_cross_alone() -> None:
    text = (TREE / "a.yaml").read_text()
    first, _ = parse_documents(text, "one.yaml")
    second, _ = parse_documents(text, "two.yaml")
    assert [str(v) for v in validate_cross(first + second)] == [
        "two.yaml[0] RatePolicy ml/budget: metadata.name: duplicate RatePolicy ml/budget, "
        "first defined in one.yaml[0]",
        "two.yaml[1] AccessPolicy ml/budget: metadata.name: duplicate AccessPolicy ml/budget, "
        "first defined in one.yaml[1]",
    ]
    assert validate_cross(first) == []


def test_empty_stream() -> None:
    assert parse_documents("", "e.yaml") == ([], [])
    assert parse_documents("# only a comment\n---\n---\n", "e.yaml") == ([], [])

"""The store applies each unit (file) whole or not at all and keeps the last good one."""

from __future__ import annotations

from pathlib import Path

from controlplane.compile.inputs.store import ACCEPTED, REJECTED, PolicyStore
from controlplane.sources.files import FileSource

GOOD = """\
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {{name: {name}, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  defaultAction: {default}
  rules: [{{action: Allow, to: {{paths: [/v1/predict]}}}}]
"""


def _write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


def _names(store: PolicyStore) -> list[tuple[str, str]]:
    return [(p.metadata.name, p.spec.default_action) for p in store.current().policies]


def test_valid_files_are_applied_and_generations_count_spec_changes(tmp_path: Path) -> None:
    store = PolicyStore()
    source = FileSource([tmp_path], store)
    _write(tmp_path, "a.yaml", GOOD.format(name="a", default="Deny"))
    assert source.sync()
    assert _names(store) == [("a", "Deny")]
    assert store.generation(("AccessPolicy", "demo", "a")) == 1
    assert not source.sync()  # nothing changed on disk: no new revision
    _write(tmp_path, "a.yaml", GOOD.format(name="a", default="Allow"))
    assert source.sync()
    assert store.generation(("AccessPolicy", "demo", "a")) == 2
    assert store.current().revision == 2


def test_an_invalid_edit_keeps_the_last_good_file_and_reports_why(tmp_path: Path) -> None:
    store = PolicyStore()
    source = FileSource([tmp_path], store)
    _write(tmp_path, "a.yaml", GOOD.format(name="a", default="Deny"))
    _write(tmp_path, "b.yaml", GOOD.format(name="b", default="Deny"))
    source.sync()
    revision = store.current().revision
    # Two documents in one file, the second broken: neither is applied.
    _write(
        tmp_path,
        "a.yaml",
        GOOD.format(name="a", default="Allow") + "---\n" + GOOD.format(name="c", default="Never"),
    )
    assert not source.sync()
    assert store.current().revision == revision
    assert _names(store) == [("a", "Deny"), ("b", "Deny")]
    states = {s.key[2]: s for s in store.statuses()}
    assert states["a"].state == REJECTED and states["a"].serving
    assert states["c"].state == REJECTED and not states["c"].serving
    assert any("spec.defaultAction" in e for e in states["c"].errors)
    assert states["b"].state == ACCEPTED
    # Another file's valid edit still goes through.
    _write(tmp_path, "b.yaml", GOOD.format(name="b", default="Allow"))
    assert source.sync()
    assert _names(store) == [("a", "Deny"), ("b", "Allow")]


def test_yaml_syntax_errors_are_unit_errors(tmp_path: Path) -> None:
    store = PolicyStore()
    source = FileSource([tmp_path], store)
    _write(tmp_path, "a.yaml", GOOD.format(name="a", default="Deny"))
    source.sync()
    _write(tmp_path, "a.yaml", "kind: [AccessPolicy\n")
    source.sync()
    assert _names(store) == [("a", "Deny")]
    errors = store.unit_errors()
    assert list(errors) == [str(tmp_path / "a.yaml")]
    assert errors[str(tmp_path / "a.yaml")]


def test_a_duplicate_in_another_file_is_rejected_not_merged(tmp_path: Path) -> None:
    store = PolicyStore()
    source = FileSource([tmp_path], store)
    _write(tmp_path, "a.yaml", GOOD.format(name="a", default="Deny"))
    source.sync()
    _write(tmp_path, "b.yaml", GOOD.format(name="a", default="Allow"))
    source.sync()
    assert _names(store) == [("a", "Deny")]
    (error,) = store.unit_errors()[str(tmp_path / "b.yaml")]
    assert "duplicate of" in error and "a.yaml[0]" in error


def test_removing_a_file_removes_its_policies(tmp_path: Path) -> None:
    store = PolicyStore()
    source = FileSource([tmp_path], store)
    _write(tmp_path, "a.yaml", GOOD.format(name="a", default="Deny"))
    _write(tmp_path, "b.yaml", GOOD.format(name="b", default="Deny"))
    source.sync()
    (tmp_path / "a.yaml").unlink()
    assert source.sync()
    assert _names(store) == [("b", "Deny")]

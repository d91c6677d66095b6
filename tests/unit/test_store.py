"""The store applies each unit (file) whole or not at all and keeps the last good one."""

from __future__ import annotations

from pathlib import Path

from controlplane.sources.files import FileSource
from controlplane.store import ACCEPTED, REJECTED, PolicyStore

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


def test_judging_only_the_affected_units_gives_what_judging_all_gives() -> None:
    """A change re-judges only the units that share a policy name with it (transitively).
    Random edits, removals, broken versions and duplicates across 12 units that name 6
    policies between them, applied to that store and to one that re-judges every unit on
    every change (the reference): the same policies, statuses, generations and errors."""
    import random

    from controlplane.api import LoadedPolicy, Violation
    from controlplane.api.kinds import KINDS
    from controlplane.store import UnitContent

    def content(unit: str, names: list[str], default: str, broken: bool) -> UnitContent:
        loaded = tuple(
            LoadedPolicy(
                KINDS["AccessPolicy"].model_validate(
                    {
                        "apiVersion": "modelguard.io/v1alpha1",
                        "kind": "AccessPolicy",
                        "metadata": {"name": name, "namespace": "demo"},
                        "spec": {"targetRef": {"service": "m"}, "defaultAction": default},
                    }
                ),
                unit,
                i,
            )
            for i, name in enumerate(names)
        )
        violations = (
            (Violation(unit, 0, "AccessPolicy", f"demo/{names[0]}", "spec", "broken"),)
            if broken and names
            else ()
        )
        return UnitContent(() if broken else loaded, violations)

    class Reference(PolicyStore):
        def _affected(self, units: set[str], new_keys: set[tuple[str, str, str]]) -> set[str]:
            return set(units) | set(self._latest)

    rng = random.Random(18)
    incremental, reference = PolicyStore(), Reference()
    units = [f"u{i:02d}.yaml" for i in range(12)]
    for step in range(400):
        unit = rng.choice(units)
        if rng.random() < 0.15:
            changed, removed = {}, [unit]
        else:
            names = rng.sample([f"p{i}" for i in range(6)], rng.randint(0, 2))
            default = rng.choice(["Deny", "Allow"])
            changed = {unit: content(unit, names, default, rng.random() < 0.2)}
            removed = []
        got = incremental.apply(changed, removed)
        want = reference.apply(changed, removed)
        assert got == want, step
        assert incremental.current() == reference.current(), step
        assert incremental.statuses() == reference.statuses(), step
        assert incremental.unit_errors() == reference.unit_errors(), step

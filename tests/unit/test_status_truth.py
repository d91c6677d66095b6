"""`status` tells the truth (issue 19): what the store reports for syntax errors,
duplicates, fixes and empty files, and what `status` makes of it (warnings, exit code)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from controlplane.api import load_paths
from controlplane.app.status_cli import render, unhealthy
from controlplane.compile.inputs.store import ACCEPTED, REJECTED, PolicyStore
from controlplane.gen.modelguard.admin.v1 import admin_pb2
from controlplane.sources.files import FileSource

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {{name: {name}, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  defaultAction: {default}
  rules: [{{action: Allow, to: {{paths: [/v1/predict]}}}}]
"""
KEY = ("AccessPolicy", "demo", "x")


def _status(store: PolicyStore) -> dict[tuple[str, str, str], tuple[str, str, tuple[str, ...]]]:
    return {s.key: (s.state, Path(s.source).name, s.errors) for s in store.statuses()}


def test_a_yaml_syntax_error_shows_the_files_policies_as_rejected_with_the_line(
    tmp_path: Path,
) -> None:
    store = PolicyStore()
    source = FileSource([tmp_path], store)
    (tmp_path / "a.yaml").write_text(POLICY.format(name="x", default="Deny"))
    source.sync()
    assert _status(store)[KEY][0] == ACCEPTED
    (tmp_path / "a.yaml").write_text(POLICY.format(name="x", default="Deny") + "  bad: [\n")
    source.sync()
    state, where, errors = _status(store)[KEY]
    assert (state, where) == (REJECTED, "a.yaml")
    assert any("a.yaml" in e and "invalid YAML" in e and "line " in e for e in errors), errors
    # The last good version still serves, and status says so.
    assert [p.metadata.name for p in store.current().policies] == ["x"]
    assert next(s for s in store.statuses() if s.key == KEY).serving


def test_a_fix_is_logged_as_accepted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = PolicyStore()
    source = FileSource([tmp_path], store)
    (tmp_path / "a.yaml").write_text("kind: [\n")
    with caplog.at_level(logging.INFO):
        source.sync()
        assert any("a.yaml rejected" in r.getMessage() for r in caplog.records)
        caplog.clear()
        (tmp_path / "a.yaml").write_text(POLICY.format(name="x", default="Deny"))
        source.sync()
    assert any("a.yaml accepted again: 1 policy" in r.getMessage() for r in caplog.records)
    assert _status(store)[KEY][0] == ACCEPTED


@pytest.mark.parametrize("arrival", [("a.yaml", "b.yaml"), ("b.yaml", "a.yaml")])
def test_a_duplicate_has_one_winner_whatever_the_order_and_validate_agrees(
    tmp_path: Path, arrival: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    store = PolicyStore()
    source = FileSource([tmp_path], store)
    defaults = {"a.yaml": "Deny", "b.yaml": "Allow"}
    with caplog.at_level(logging.INFO):
        for name in arrival:  # one file at a time: the watcher sees them in this order
            (tmp_path / name).write_text(POLICY.format(name="x", default=defaults[name]))
            source.sync()
    # The first file in sorted order serves, as validate says.
    assert [p.spec.default_action for p in store.current().policies] == ["Deny"]
    state, where, _ = _status(store)[KEY]
    assert (state, where) == (ACCEPTED, "a.yaml")  # SOURCE names the winner
    duplicate = [e for e in store.unit_errors().get(str(tmp_path / "b.yaml"), ())]
    assert duplicate and "duplicate of" in duplicate[0] and "a.yaml" in duplicate[0]
    assert any(
        "b.yaml" in r.getMessage() and "duplicate" in r.getMessage() for r in caplog.records
    ), "the duplicate must be logged"
    loaded, violations = load_paths([tmp_path / "b.yaml", tmp_path / "a.yaml"])
    assert [Path(lp.source).name for lp in loaded] == ["a.yaml"]
    assert [Path(v.source).name for v in violations] == ["b.yaml"]
    # Removing the winner hands the policy to the other file.
    (tmp_path / "a.yaml").unlink()
    source.sync()
    assert [p.spec.default_action for p in store.current().policies] == ["Allow"]
    assert _status(store)[KEY][:2] == (ACCEPTED, "b.yaml")


def test_an_empty_policy_file_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from controlplane.app.cli import main

    (tmp_path / "empty.yaml").write_text("# nothing yet\n---\n")
    assert main(["validate", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "empty.yaml: no policies in this file" in err
    with caplog.at_level(logging.INFO):
        FileSource([tmp_path], PolicyStore()).sync()
    assert any("no policies in this file" in r.getMessage() for r in caplog.records)


def _report(state: str = "Accepted", sidecars: tuple[str, ...] = ()) -> admin_pb2.StatusReport:
    report = admin_pb2.StatusReport()
    report.policies.add(
        kind="AccessPolicy",
        namespace="demo",
        name="x",
        source="policies/a.yaml",
        generation=1,
        state=state,
        sidecars=list(sidecars),
    )
    return report


def test_a_policy_that_targets_nothing_is_warned_about() -> None:
    text = render(_report())
    assert "Warnings:" in text
    assert "AccessPolicy demo/x: its target matches no connected sidecar" in text
    assert "Warnings:" not in render(_report(sidecars=("digits-model-0",)))


def test_status_is_unhealthy_when_a_policy_is_rejected_or_a_sidecar_nacked() -> None:
    assert not unhealthy(_report(sidecars=("s",)))
    assert unhealthy(_report(state="Rejected"))
    report = _report()
    report.source_errors.append("policies/b.yaml[0] ...: duplicate")
    assert unhealthy(report)
    report = _report()
    sidecar = report.sidecars.add(node_id="s")
    sidecar.resources.add(type="RDS", state="NACKED", last_nack_error="bad route")
    assert unhealthy(report)


def test_plaintext_attempts_are_shown_with_their_advice() -> None:
    report = _report(sidecars=("s",))
    report.refused["plaintext_on_tls"] = 3
    text = render(report)
    assert "Refused: 3 plaintext connection(s) to the TLS xDS port" in text
    assert "--identity-dir" in text and "--insecure" in text

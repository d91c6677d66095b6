"""Generated code is checked in; this fails when it is stale (run `make proto`)."""

from __future__ import annotations

from controlplane import gen_protos


def test_generated_protos_are_fresh() -> None:
    assert gen_protos.main(["--check"]) == 0, "controlplane/gen is stale: run `make proto`"

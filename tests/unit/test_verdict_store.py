"""The verdict store is bounded and incremental, and keeps no key (issue 18, items 6 and 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monitor_policy import policies

from controlplane.extraction.verdicts import (
    ClientRef,
    Enforcement,
    FileBackend,
    VerdictStore,
    digest,
)
from controlplane.policies.extraction.verdicts_compile import compile_verdicts
from controlplane.policies.extraction.verdicts_translate import DIGEST_HEX, digest_filter

POLICY = "demo/digits-model"


def enforcement(kind: str, key: str, since: float, until: float = 4e9) -> Enforcement:
    client = ClientRef.of(POLICY, key, "header", "x-api-key")
    if kind == "throttle":
        return Enforcement("throttle", client, since, until, "prada", 5, 60)
    return Enforcement("quarantine", client, since, until, "coverage")


def test_past_the_cap_the_oldest_throttles_go_first_then_the_oldest_quarantines() -> None:
    store = VerdictStore(max_per_policy=4)
    store.put(enforcement("throttle", "t1", 1))
    store.put(enforcement("quarantine", "q1", 2))
    store.put(enforcement("throttle", "t2", 3))
    store.put(enforcement("quarantine", "q2", 4))
    store.put(enforcement("quarantine", "q3", 5))  # over: t1 (oldest throttle) goes
    assert {e.client.key for e in store.active()} == {digest(k) for k in ("q1", "t2", "q2", "q3")}
    store.put(enforcement("quarantine", "q4", 6))  # t2 goes
    store.put(enforcement("quarantine", "q5", 7))  # no throttle left: q1 (oldest) goes
    assert {e.client.key for e in store.active()} == {digest(k) for k in ("q2", "q3", "q4", "q5")}
    assert store.evicted == 3
    # Another policy has its own cap.
    other = Enforcement("quarantine", ClientRef.of("x/y", "k"), 8, 4e9, "prada")
    store.put(other)
    assert store.count(POLICY) == 4 and store.count("x/y") == 1


def test_a_long_key_costs_what_a_short_one_does() -> None:
    store = VerdictStore()
    store.put(enforcement("quarantine", "k" * 50_000, 1))
    (e,) = store.active()
    assert len(e.client.key) == 64 and "kkkk" not in json.dumps(e.to_json())
    assert store.release("k" * 50_000) == [e]


def test_release_by_key_digest_or_fingerprint() -> None:
    store = VerdictStore()
    for name in ("a", "b", "c"):
        store.put(enforcement("quarantine", name, 1))
    fp = ClientRef.of(POLICY, "b").fingerprint
    assert fp.startswith("sha256:") and len(fp) == 7 + 16
    assert [e.client.fingerprint for e in store.release(fp)] == [fp]
    assert len(store.release(digest("a"))) == 1
    assert len(store.release(ClientRef.of(POLICY, "c").fingerprint[7:19])) == 1  # 12 hex
    assert store.active() == ()
    store.put(enforcement("quarantine", "d", 1))
    assert store.release("sha256:12") == []  # too short to name anyone


def test_the_file_grows_by_one_line_per_change_and_is_compacted(tmp_path: Path) -> None:
    path = tmp_path / "verdicts.jsonl"
    store = VerdictStore(path)
    store.put(enforcement("quarantine", "a", 1))
    size = path.stat().st_size
    store.put(enforcement("quarantine", "b", 2))
    # Appended, not rewritten: the first line is untouched and one line was added.
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and path.stat().st_size < 2 * size + 10
    assert path.stat().st_mode & 0o777 == 0o600
    assert '"a"' not in path.read_text()
    store.release("a")
    assert len(path.read_text().splitlines()) == 3  # a "del" line
    assert {e.client.key for e in VerdictStore(path).active()} == {digest("b")}
    # Many changes: the log is compacted to the live entries now and then.
    for i in range(3 * FileBackend.COMPACT_MIN):
        store.put(enforcement("throttle", f"t{i % 10}", 10 + i))
    assert len(path.read_text().splitlines()) <= 2 * FileBackend.COMPACT_MIN + 1
    assert len(VerdictStore(path).active()) == 11
    # A torn last line (a crash mid-write) costs that line only.
    with path.open("a") as out:
        out.write('{"put": {"kind": "quar')
    assert len(VerdictStore(path).active()) == 11


def test_the_earlier_file_format_is_read_and_its_keys_digested(tmp_path: Path) -> None:
    path = tmp_path / "verdicts.json"
    raw = {
        "kind": "quarantine", "since": 1, "until": 4e9, "reason": "prada", "requests": 0,
        "per_seconds": 0,
        "client": {"policy": POLICY, "key": "old-key", "source": "header", "header": "x-api-key"},
    }
    path.write_text(json.dumps({"enforcements": [raw]}, indent=1))
    (e,) = VerdictStore(path).active()
    assert e.client.key == digest("old-key")
    assert "old-key" not in path.read_text()


def test_ten_thousand_quarantines_cost_under_64_bytes_each_in_the_sidecar_config() -> None:
    (policy,) = policies()
    few = [enforcement("quarantine", f"attacker-{i}", i) for i in range(10)]
    many = [enforcement("quarantine", f"attacker-{i}", i) for i in range(10_000)]

    def size(items: list[Enforcement]) -> int:
        ir = compile_verdicts([policy], items)
        assert ir is not None
        lua = digest_filter(ir.quarantined, ir.throttled)
        assert lua is not None
        return lua.ByteSize()

    per_key = (size(many) - size(few)) / (10_000 - 10)
    assert per_key <= DIGEST_HEX + 2 + 1  # the digest, the policy's index


def test_usage_unthrottle_parses_a_client_and_a_policy() -> None:
    from controlplane.app.cli import build_parser

    args = build_parser().parse_args(
        ["usage", "unthrottle", "sha256:3c1f0e9a2b7d", "--policy", "demo/digits-model"]
    )
    assert (args.limit, args.client, args.policy) == (
        "unthrottle", "sha256:3c1f0e9a2b7d", "demo/digits-model"
    )
    # Without `unthrottle`, the positional is still the limit filter it always was.
    assert build_parser().parse_args(["usage", "daily"]).limit == "daily"


def test_usage_unthrottle_without_a_control_plane_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from controlplane.app.cli import main
    from controlplane.netutil import free_port

    # Exit 2 and the same words as every admin command (status documents 2 for this).
    assert main(["usage", "--admin", f"127.0.0.1:{free_port()}", "unthrottle", "k"]) == 2
    assert "cannot reach the control plane at 127.0.0.1:" in capsys.readouterr().err


def test_over_99_policies_widen_the_policy_index_instead_of_failing() -> None:
    import re as regex

    from controlplane.ir import ClientKeyIR, PolicyRef
    from controlplane.policies.extraction.ir import ClientVerdictIR
    from controlplane.policies.extraction.verdicts_translate import digest_script

    clients = tuple(
        ClientVerdictIR(
            PolicyRef("ExtractionPolicy", "demo", f"p{i}"), ClientKeyIR("header", "x-api-key"),
            digest(f"k{i}"),
        )
        for i in range(120)
    )
    script = digest_script(clients, ("x-api-key",))
    (data,) = regex.findall(r'\["x-api-key"\]="([0-9a-f]*)"', script)
    assert len(data) == 120 * (DIGEST_HEX + 3)
    assert f"for i = 1, #data, {DIGEST_HEX} + 3 do" in script  # the Lua reads 3-digit indexes


def test_verified_ids_are_shown_raw_keys_only_by_fingerprint() -> None:
    # A key id / tenant / claim header the sidecar sets itself is no secret: shown as is.
    tenant = ClientRef.of(POLICY, "acme", "header", "x-modelguard-tenant")
    assert (tenant.key, tenant.shown) == (digest("acme"), "acme")
    assert tenant.named_by("acme") and tenant.named_by(tenant.fingerprint)
    # A raw header (x-api-key) is a secret: stored as a digest, shown as a fingerprint.
    raw = ClientRef.of(POLICY, "sk-live-1", "header", "x-api-key")
    assert raw.label is None and raw.shown == raw.fingerprint
    assert "sk-live-1" not in json.dumps(Enforcement("quarantine", raw, 0, 1, "p").to_json())
    # The label survives the verdict file.
    again = Enforcement.from_json(Enforcement("quarantine", tenant, 0, 1, "p").to_json())
    assert again.client == tenant

"""``modelguard profile build | show``: a policy's detector profile, offline.

``build POLICY_FILE`` calibrates every ExtractionPolicy of the file that names reference
data, exactly as the control plane would, and stores each profile in the profile cache
(``--cache-dir``, by default ``.modelguard/profiles``, where ``modelguard serve`` with its
default state directory finds it: a server started afterwards does not recalibrate); with
``-o FILE`` (one policy) the profile is written there instead. ``show`` prints a profile:
a profile JSON file, a policy file's cached profiles, or every profile in the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from controlplane.app.cliutil import existing_file
from controlplane.extraction.calibrate import (
    SENSITIVITIES,
    Profile,
    Settings,
    cache_key,
    calibrate_reference,
)

DEFAULT_CACHE = Path(".modelguard/profiles")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="profile cache")
    sub = parser.add_subparsers(dest="profile_command", required=True)
    p = sub.add_parser("build", help="calibrate the profiles of a policy file's reference data")
    p.add_argument("policy_file", type=existing_file, help="policy YAML (ExtractionPolicy)")
    p.add_argument("-o", "--output", type=Path, help="write the profile here (one policy)")
    p.add_argument("--policy", default="", help="namespace/name: only this policy")
    p.add_argument(
        "--seed",
        type=int,
        default=Settings.seed,
        help="of the simulated benign clients (the same seed gives the same profile)",
    )
    p = sub.add_parser("show", help="print a profile (file), a policy file's, or the cache's")
    p.add_argument(
        "target", nargs="?", type=existing_file, help="profile JSON or policy YAML"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _policies(path: Path, only: str) -> list[Any]:
    from controlplane.api import ExtractionPolicy, parse_documents

    loaded, violations = parse_documents(path.read_text(), str(path))
    for violation in violations:
        print(f"error: {violation}", file=sys.stderr)
    if violations:
        raise SystemExit(1)
    out = []
    for item in loaded:
        policy = item.policy
        key = f"{policy.metadata.namespace}/{policy.metadata.name}"
        if not isinstance(policy, ExtractionPolicy) or (only and key != only):
            continue
        detection = policy.spec.detection
        if detection is None or detection.reference is None:
            print(f"{key}: no spec.detection.reference: reference-free thresholds, nothing "
                  "to calibrate", file=sys.stderr)
            continue
        if detection.reference.file is None:
            print(f"{key}: reference from a ConfigMap: build it in the cluster", file=sys.stderr)
            continue
        out.append((key, detection.reference))
    return out


def _summary(payload: dict[str, Any]) -> str:
    lines = [f"profile {payload['name']}"]
    calibration = payload.get("calibration", {})
    for field in ("reference_sha256", "version", "seed", "reference_points", "held_out_points",
                  "segments", "benign_clients"):
        if field in calibration:
            lines.append(f"  {field}: {calibration[field]}")
    lines.append(f"  {'sensitivity':12s} {'prada':>8s} {'nearDup':>8s} {'OOD':>8s} "
                 f"{'coverage':>8s} {'dupRadius':>10s}")
    for sensitivity in SENSITIVITIES:
        t = payload["thresholds"].get(sensitivity)
        if t is None:
            continue
        lines.append(
            f"  {sensitivity:12s} {t['prada']:8.3f} {t['near_duplicate']:8.2f} "
            f"{t['out_of_distribution']:8.2f} {t['coverage']:8.2f} {t['duplicate_radius']:10.3f}"
        )
    maxima = calibration.get("benign_maxima")
    if maxima:
        lines.append("  benign maxima: " + ", ".join(f"{k} {v}" for k, v in maxima.items()))
    return "\n".join(lines)


def build(args: argparse.Namespace) -> int:
    from controlplane.api.reference import ReferenceError, load_file

    chosen = _policies(args.policy_file, args.policy)
    if not chosen:
        print("no ExtractionPolicy with a reference file to calibrate", file=sys.stderr)
        return 1
    if args.output and len(chosen) > 1:
        print("-o takes one policy: name it with --policy", file=sys.stderr)
        return 1
    settings = Settings(seed=args.seed)
    for key, reference in chosen:
        try:
            data = load_file(reference.file, reference.label_column)
        except ReferenceError as err:
            print(f"{key}: spec.detection.reference: {err}", file=sys.stderr)
            return 1
        started = time.monotonic()
        profile = calibrate_reference(key, data, settings)
        path = args.output or (
            args.cache_dir / f"{cache_key(data, settings, reference.label_column)}.json"
        )
        profile.save(path)
        print(_summary(profile.payload()))
        print(f"  calibrated in {time.monotonic() - started:.1f}s; wrote {path}")
    return 0


def show(args: argparse.Namespace) -> int:
    target: Path | None = args.target
    payloads: list[dict[str, Any]] = []
    if target is None:
        paths = sorted(args.cache_dir.glob("*.json")) if args.cache_dir.is_dir() else []
        payloads = [json.loads(p.read_text()) for p in paths]
        if not payloads:
            print(f"no profiles in {args.cache_dir}", file=sys.stderr)
            return 1
    elif target.suffix == ".json":
        try:
            payloads = [json.loads(target.read_text())]
            _summary(payloads[0])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            print(f"modelguard profile show: {target}: not a modelguard profile ({err!r})",
                  file=sys.stderr)
            return 1
    else:
        from controlplane.api.reference import ReferenceError, load_file

        for key, reference in _policies(target, ""):
            try:
                data = load_file(reference.file, reference.label_column)
            except ReferenceError as err:
                print(f"{key}: spec.detection.reference: {err}", file=sys.stderr)
                return 1
            path = args.cache_dir / f"{cache_key(data, Settings(), reference.label_column)}.json"
            if not path.is_file():
                print(f"{key}: not calibrated yet (no {path}): run modelguard profile build",
                      file=sys.stderr)
                return 1
            payloads.append({**json.loads(path.read_text()), "name": key})
    if args.json:
        print(json.dumps(payloads if len(payloads) != 1 else payloads[0], indent=1))
    else:
        print("\n\n".join(_summary(p) for p in payloads))
    return 0


def run(args: argparse.Namespace) -> int:
    return build(args) if args.profile_command == "build" else show(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane.app.profile_cli")
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["Profile", "add_arguments", "main", "run"]

if __name__ == "__main__":
    raise SystemExit(main())

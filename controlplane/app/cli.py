"""The ``modelguard`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from controlplane.app.cliutil import (
    GLOBAL_FLAGS_HELP,
    START_FILES,
    add_global_flags,
    check_flag_values,
    port_number,
    resolve_globals,
    seconds_over,
)


def _validate(args: argparse.Namespace) -> int:
    from controlplane.api import load_paths
    from controlplane.api.loader import empty_policy_files, policy_files
    from controlplane.api.warnings import policy_warnings

    loaded, violations = load_paths(args.paths)
    for violation in violations:
        print(violation)
    for empty in empty_policy_files(args.paths):
        print(f"warning: {empty}: no policies in this file (empty)", file=sys.stderr)
    for given in args.paths:  # a wrong folder passed as "0 policies valid"
        if Path(given).is_dir() and not policy_files(Path(given)):
            print(
                f"warning: {given}: no policy files (.yaml, .yml) in this folder",
                file=sys.stderr,
            )
    for lp in loaded:
        policy = lp.policy
        for warning in policy_warnings(policy):
            name = f"{policy.metadata.namespace}/{policy.metadata.name}"
            print(f"{lp.source}[{lp.index}] {policy.kind} {name}: warning: {warning}")
    if violations:
        print(f"{len(violations)} violation(s) in {len(args.paths)} path(s)", file=sys.stderr)
        return 1
    print(f"{len(loaded)} polic{'y' if len(loaded) == 1 else 'ies'} valid")
    return 0


def _version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"modelguard {version('modelguard')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "modelguard (not installed: version unknown)"


def _version(args: argparse.Namespace) -> int:
    print(_version_text())
    return 0


def _serve(args: argparse.Namespace) -> int:
    # Cluster mode reads policies from the API server, not from --policies.
    unusable = _missing_start_files("serve", args) or (
        None if args.kubernetes else _unusable_policy_paths("serve", args.policies)
    )
    if unusable is not None:
        print(unusable, file=sys.stderr)
        return 2
    from controlplane.app.server import ControlPlane, ControlPlaneConfig
    from controlplane.identity import service as identity_service
    from controlplane.telemetry import settings as telemetry_settings

    config = ControlPlaneConfig(
        policy_paths=tuple(args.policies),
        xds_host=args.xds_host,
        xds_port=args.xds_port,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        admin_token_file=args.admin_token_file or None,
        xds_max_connection_age=args.xds_max_connection_age,
        telemetry=telemetry_settings.from_args(args),
        verdicts_path=args.verdicts or None,
        rate_limit_backend=args.rate_limit_backend,
        quota_assignment_ttl=args.quota_assignment_ttl,
        identity=identity_service.config_from_args(args, ".modelguard/identity"),
        xff_num_trusted_hops=args.xff_num_trusted_hops,
        watch_plaintext=True,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )

    if getattr(args, "kubernetes", False):
        from controlplane.app.cluster import NoClusterConfig, serve_cluster

        try:
            return serve_cluster(args, config)
        except NoClusterConfig as err:  # was a traceback from the kubernetes client
            print(f"modelguard serve --kubernetes: {err}", file=sys.stderr)
            return 1

    async def main() -> None:
        plane = ControlPlane(config)
        await plane.start()
        plane.install_signal_handlers()
        print(
            f"modelguard control plane: xDS on {config.xds_host}:{plane.xds_port}, "
            f"admin on {config.admin_host}:{plane.admin_port}"
            + (f", metrics on {plane.http.url}/metrics" if plane.http is not None else ""),
            flush=True,
        )
        try:
            await plane.wait_closed()
        finally:
            await plane.stop(config.shutdown_grace)

    from controlplane.app.server import PortInUse

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())
    except PortInUse as err:
        print(f"modelguard serve: {err}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    unusable = _missing_start_files("run", args) or _unusable_policy_paths("run", [args.policies])
    if unusable is not None:
        print(unusable, file=sys.stderr)
        return 2
    from controlplane.app.runner import run_embedded

    return run_embedded(args)


def _status(args: argparse.Namespace) -> int:
    from controlplane.app.status_cli import show_status

    return show_status(args)


def _traces(args: argparse.Namespace) -> int:
    from controlplane.app.traces_cli import show_traces

    return show_traces(args)


def _bootstrap(args: argparse.Namespace) -> int:
    from controlplane.app import bootstrap_cli as bootstrap

    return bootstrap.run(args)


def build_parser() -> argparse.ArgumentParser:
    from controlplane.identity.service import add_arguments as identity_arguments

    parser = argparse.ArgumentParser(
        prog="modelguard",
        description="Protect model APIs from extraction: a control plane for Envoy sidecars.",
        epilog=GLOBAL_FLAGS_HELP + ". Listing commands take -o json|yaml|wide (--json: -o json).",
    )
    # `modelguard --version`, as most commands answer it (kubectl's spelling is `version`).
    parser.add_argument("--version", action="version", version=_version_text())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("version", help="this modelguard's version")
    p.set_defaults(func=_version)

    p = sub.add_parser("validate", help="validate policy files; exit 1 on any violation")
    p.add_argument("paths", nargs="+", help="policy files or folders")
    p.set_defaults(func=_validate)

    p = sub.add_parser("run", help="the embedded default: control plane, demo model, sidecar")
    p.add_argument(
        "--policies", default="policies/", metavar="PATH", help="policy folder or file (watched)"
    )
    p.add_argument(
        "--listen-port", type=port_number, default=10000, help="sidecar port for clients"
    )
    p.add_argument(
        "--outbound-port",
        type=port_number,
        default=15001,
        help="the demo workload's egress port on the sidecar (0: no egress control)",
    )
    p.add_argument(
        "--xds-port", type=port_number, default=18000, help="the control plane's xDS port"
    )
    p.add_argument(
        "--admin-port", type=port_number, default=18001, help="admin API (status, quarantine…)"
    )
    p.add_argument("--workdir", default=".modelguard", help="bootstraps, keys and logs")
    p.add_argument(
        "--metrics-port",
        type=port_number,
        default=18002,
        help="HTTP on 127.0.0.1: Prometheus /metrics and the live page /ui",
    )
    identity_arguments(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("serve", help="the control plane alone")
    p.add_argument(
        "--policies",
        nargs="+",
        default=["policies/"],
        metavar="PATH",
        help="policy files or folders, watched (default: policies/; ignored with --kubernetes)",
    )
    identity_arguments(p)
    p.add_argument("--xds-host", default="127.0.0.1", help="where sidecars reach xDS")
    p.add_argument("--xds-port", type=port_number, default=18000, help="xDS port (18000)")
    p.add_argument(
        "--admin-host",
        default="127.0.0.1",
        help="admin API address (beyond loopback only with --admin-token-file)",
    )
    p.add_argument("--admin-port", type=port_number, default=18001, help="admin port (18001)")
    p.add_argument(
        "--metrics-port",
        type=port_number,
        default=None,
        help="serve HTTP on the admin host: Prometheus /metrics and the live page /ui "
        "(default: not served; 0: any free port)",
    )
    p.add_argument(
        "--metrics-host",
        default=None,
        help="where --metrics-port listens (default: the admin host); the live page and its "
        "release answer loopback callers only, like the admin API",
    )
    p.add_argument(
        "--xds-max-connection-age",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="sidecar connections are closed (GOAWAY) after this long, so they rebalance "
        "over replicas after a rollout",
    )
    p.add_argument(
        "--admin-token-file",
        help="bearer token (a mounted Secret) every admin call must carry; required when "
        "--admin-host is not a loopback address",
    )
    p.add_argument(
        "--rate-limit-backend",
        default="memory",
        help="where budgets are counted: memory, or redis://HOST:PORT/DB (shared by replicas)",
    )
    p.add_argument(
        "--quota-assignment-ttl",
        type=seconds_over(5),
        default=15,
        metavar="SECONDS",
        help="how long sidecars keep a budget's last assignment when the quota service or its "
        "backend stops answering, before the policy's failureMode applies (over 5)",
    )
    p.add_argument(
        "--verdicts",
        default=".modelguard/verdicts.json",
        help="file quarantines persist in across restarts ('' keeps them in memory)",
    )
    from controlplane.telemetry import settings as telemetry_cli_settings

    telemetry_cli_settings.add_arguments(p)
    from controlplane.app import cluster as kubernetes_source

    kubernetes_source.add_arguments(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("inject", help="add the Envoy sidecar to workloads, like kube-inject")
    from controlplane.app import inject_cli

    inject_cli.add_arguments(p)
    p.set_defaults(func=inject_cli.run)

    p = sub.add_parser("ca", help="the CA shared by control-plane replicas (ca init)")
    from controlplane.app import ca_cli

    ca_cli.add_arguments(p)
    p.set_defaults(func=ca_cli.run)

    p = sub.add_parser("quarantine", help="clients the extraction monitor quarantined")
    from controlplane.app import quarantine_cli as quarantine_admin

    quarantine_admin.add_arguments(p)
    p.set_defaults(func=quarantine_admin.run)

    p = sub.add_parser("profile", help="an ExtractionPolicy's detector profile: build, show")
    from controlplane.app import profile_cli

    profile_cli.add_arguments(p)
    p.set_defaults(func=profile_cli.run)

    p = sub.add_parser(
        "status",
        help="connected sidecars and policies, like istioctl proxy-status",
        description="Sidecars' sync state and every policy's state. Exit code: 0 when every "
        "policy is accepted and no sidecar NACKed, 1 when a policy is rejected, a "
        "sidecar NACKed (like istioctl analyze) or no sidecar matches NODE, 2 when the "
        "control plane cannot be reached.",
    )
    from controlplane.app import status_cli

    status_cli.add_arguments(p)
    p.set_defaults(func=_status)

    p = sub.add_parser("usage", help="rate limit and budget usage: top clients, who is over")
    from controlplane.app import usage_cli as ratelimit_admin

    ratelimit_admin.add_arguments(p)
    p.set_defaults(func=ratelimit_admin.run)

    p = sub.add_parser("traces", help="recent traces and access logs; --follow streams them")
    from controlplane.app import traces_cli

    traces_cli.add_arguments(p)
    p.set_defaults(func=_traces)

    p = sub.add_parser("bootstrap", help="write an Envoy bootstrap for a sidecar")
    try:
        from controlplane.app import bootstrap_cli as bootstrap_module

        bootstrap_module.add_arguments(p)
    except ImportError:  # pragma: no cover - the module is part of the package
        pass
    p.set_defaults(func=_bootstrap)

    p = sub.add_parser(
        "proxy-config",
        help="a sidecar's Envoy configuration and stats, like istioctl proxy-config",
    )
    from controlplane.app import proxy_config

    proxy_config.add_arguments(p)
    p.set_defaults(func=proxy_config.run)

    # Last, so that every subcommand above (and any nested one) gets them.
    add_global_flags(parser)
    check_flag_values(parser)
    return parser


# xds-protos ships older copies of these two packages' files and overwrites them; a plain
# `pip install` of modelguard leaves them so (make setup and the image reinstall them after).
SHADOWED_PROTOS = ("opentelemetry-proto", "googleapis-common-protos")


def shadowed_protos() -> str | None:
    """The command that repairs an install whose opentelemetry-proto files are xds-protos'
    older copies, or None when they are the current ones."""
    try:
        from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope  # noqa: F401
    except ImportError:
        pass
    else:
        return None
    from importlib.metadata import PackageNotFoundError, requires

    try:
        pins = [r.split(";")[0].strip() for r in requires("modelguard") or []]
    except PackageNotFoundError:  # a source tree that was never installed
        pins = []
    wanted = [
        next((pin for pin in pins if re.fullmatch(rf"{name}==[\w.]+", pin)), name)
        for name in SHADOWED_PROTOS
    ]
    return f"{sys.executable} -m pip install --force-reinstall --no-deps {' '.join(wanted)}"


def _unusable_policy_paths(command: str, paths: Sequence[str]) -> str | None:
    """Why ``run``/``serve`` cannot start on these policy paths: a path that does not exist
    would be watched as its parent folder and serve no policy at all, silently."""
    missing = [p for p in paths if not Path(p).exists()]
    if not missing:
        return None
    return (
        f"modelguard {command}: --policies {' '.join(missing)}: no such file or folder "
        f"(in {Path.cwd()}). The demo policies are the policies/ folder of a modelguard "
        "checkout; name your own with --policies PATH."
    )


def _missing_start_files(command: str, args: argparse.Namespace) -> str | None:
    """Files ``run``/``serve`` read at start that are not there: a key file was ignored (and
    every rule admitting its keys admitted nobody), a token file or CA failed with a
    traceback."""
    for dest in START_FILES:
        given = getattr(args, dest, None)
        for path in given if isinstance(given, list) else [given] if given else []:
            if not Path(path).exists():
                flag = "--" + dest.replace("_", "-")
                return f"modelguard {command}: {flag} {path}: no such file or folder"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve_globals(build_parser().parse_args(argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result: int = args.func(args)
    except ImportError as err:
        repair = shadowed_protos()
        if repair is None:
            raise
        print(
            f"modelguard: {err}\nThis install's opentelemetry-proto files are the older copies "
            "xds-protos wrote over them. Reinstall the two packages it overwrites, without "
            f"dependencies, after modelguard:\n  {repair}",
            file=sys.stderr,
        )
        return 1
    except BrokenPipeError:
        # `modelguard ... | head`: the reader left. Python's own flush of stdout at exit would
        # fail again with a traceback; point stdout at /dev/null and stop, as a piped Unix
        # tool does (the recipe of Python's signal module documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result


if __name__ == "__main__":
    raise SystemExit(main())

"""Generate controlplane/gen from proto/ (``make proto``); ``--check`` fails when stale.

The generated code is checked in so neither ``make run`` nor users need grpcio-tools.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "controlplane" / "gen"
PACKAGE = "controlplane.gen"


def _generate(into: Path) -> None:
    import grpc_tools  # only needed here, a dev dependency

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    plugin_dir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={into}",
        f"--grpc_python_out={into}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--mypy_out={into}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_DIR)
    for path in into.rglob("*.py*"):
        text = path.read_text()
        # protoc writes absolute imports rooted at proto/; ours live under controlplane.gen.
        for proto in protos:
            module = proto.removesuffix(".proto").replace("/", ".")
            parent = module.rsplit(".", 1)[0]
            text = text.replace(f"from {parent} import", f"from {PACKAGE}.{parent} import")
            text = text.replace(f"import {module}_pb2", f"import {PACKAGE}.{module}_pb2")
        path.write_text(text)
    for directory in [into, *(p for p in into.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()


def _tree(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if controlplane/gen is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        _generate(fresh)
        want, have = _tree(fresh), _tree(OUT_DIR) if OUT_DIR.exists() else {}
        stale = sorted(
            name
            for name in want.keys() | have.keys()
            if name not in want
            or name not in have
            or not filecmp.cmp(want[name], have[name], shallow=False)
        )
        if args.check:
            if stale:
                print("controlplane/gen is stale; run `make proto`:", *stale, sep="\n  ")
                return 1
            return 0
        if OUT_DIR.exists():
            shutil.rmtree(OUT_DIR)
        shutil.copytree(fresh, OUT_DIR)
        print(f"generated {len(want)} files into {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The checked-in Wasm module is the one its sources build (no toolchain needed to check)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

WASM = Path(__file__).resolve().parents[2] / "wasm"
REBUILD = "make wasm  (needs clang and lld; the target installs them on Debian)"


def _manifest() -> dict[str, str]:
    entries = {}
    for line in (WASM / "SOURCES.sha256").read_text().splitlines():
        if line and not line.startswith("#"):
            digest, name = line.split()
            entries[name] = digest
    return entries


def test_manifest_lists_every_source_and_the_module() -> None:
    sources = {str(p.relative_to(WASM)) for p in (WASM / "src").iterdir() if p.is_file()}
    assert set(_manifest()) == sources | {"build.sh", "modelguard_filter.wasm"}


def test_checked_in_module_is_built_from_the_current_sources() -> None:
    stale = [
        name
        for name, digest in _manifest().items()
        if hashlib.sha256((WASM / name).read_bytes()).hexdigest() != digest
    ]
    assert not stale, f"{stale} changed since the module was built; rebuild with: {REBUILD}"


@pytest.mark.skipif(shutil.which("clang") is None, reason="no clang: the manifest check covers it")
def test_build_is_reproducible(tmp_path: Path) -> None:
    out = tmp_path / "filter.wasm"
    subprocess.run([str(WASM / "build.sh"), str(out)], check=True, timeout=120)
    assert out.read_bytes() == (WASM / "modelguard_filter.wasm").read_bytes(), REBUILD

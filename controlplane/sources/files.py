"""The file source: a folder (or files) of policy YAML, watched for changes.

Each file is one unit of the store: an edit that leaves a file invalid is rejected whole
and the file's last good content keeps serving. Bursts of editor writes are coalesced by
the watcher; the pipeline debounces again before compiling.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import watchfiles

from controlplane.api import parse_documents, policy_files
from controlplane.api.limits import file_too_large
from controlplane.api.violations import Violation
from controlplane.compile.inputs.store import PolicyStore, UnitContent

log = logging.getLogger(__name__)


def _policy_files(roots: Sequence[Path]) -> list[Path]:
    files: set[Path] = set()
    for root in roots:
        if root.is_dir():
            files.update(policy_files(root))
        elif root.is_file():
            files.add(root)
    return sorted(files)


class FileSource:
    def __init__(self, roots: Sequence[str | Path], store: PolicyStore) -> None:
        self.roots = [Path(r) for r in roots]
        self.store = store
        self._digests: dict[str, str] = {}

    def sync(self) -> bool:
        """Read every file once; hand changed and removed files to the store."""
        changed: dict[str, UnitContent] = {}
        seen: set[str] = set()
        for path in _policy_files(self.roots):
            unit = str(path)
            seen.add(unit)
            try:
                stat = path.stat()
                too_large = file_too_large(stat.st_size)
                # Never read an oversized file: refused by its size, remembered by its stat.
                data = b"" if too_large is not None else path.read_bytes()
            except OSError as err:  # deleted between listing and reading
                log.debug("skipping %s: %s", path, err)
                seen.discard(unit)
                continue
            digest = (
                hashlib.sha256(data).hexdigest()
                if too_large is None
                else f"too-large:{stat.st_size}:{stat.st_mtime_ns}"
            )
            if self._digests.get(unit) == digest:
                continue
            self._digests[unit] = digest
            if too_large is not None:
                violation = Violation(unit, None, None, None, "", too_large)
                changed[unit] = UnitContent((), (violation,))
                log.error("policy rejected: %s", violation)
                continue
            loaded, violations = parse_documents(data.decode("utf-8", "replace"), unit)
            changed[unit] = UnitContent(tuple(loaded), tuple(violations))
            for violation in violations:
                log.error("policy rejected: %s", violation)
        removed = [u for u in self._digests if u not in seen]
        for unit in removed:
            del self._digests[unit]
            log.info("policy file removed: %s", unit)
        if not changed and not removed:
            return False
        return self.store.apply(changed, removed)

    async def watch(self, stop: asyncio.Event | None = None) -> None:
        """Re-sync on every change under the roots until ``stop`` is set."""
        self.sync()
        watch_paths = [r if r.is_dir() else r.parent for r in self.roots]
        async for _ in watchfiles.awatch(
            *watch_paths, stop_event=stop, debounce=50, step=20, recursive=True
        ):
            try:
                # Off the event loop: reading, parsing and validating a large file must not
                # stall ADS or the admin API (the store and its listeners are thread-safe).
                await asyncio.to_thread(self.sync)
            except Exception:  # a source must never die on one bad read
                log.exception("policy sync failed; last good policies keep serving")

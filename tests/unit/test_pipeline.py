"""Rebuilds off the event loop: compile and translate run in a worker thread, the loop only
publishes. Each rebuild compiles one frozen set of inputs; a newer one supersedes a running
one; a sidecar whose compile fails keeps its last good snapshot.

The worker is paced through ``Pipeline.compile`` (the real compiler, wrapped to wait on an
event): what the loop does while a sidecar compiles is then certain, not a race.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controlplane.compile import compile_sidecar
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.ir import SidecarIR
from controlplane.pipeline import Pipeline
from controlplane.sources.files import FileSource
from tests.unit.test_shapes import ACCESS
from tests.unit.test_shapes import _pipeline as shapes_pipeline


def _pipeline(tmp_path: Path, sidecars: int) -> tuple[Pipeline, FileSource]:
    """``sidecars`` sidecars (node-0, node-1, ...) on ports of their own: each one is
    compiled, none copied."""
    ids = tuple(f"node-{i}" for i in range(sidecars))
    pipeline, files = shapes_pipeline(tmp_path, sidecars, ports=True, ids=ids)
    return pipeline, files


def _paced(pipeline: Pipeline, before: Callable[[int, Sidecar], None]) -> list[str]:
    """Calls ``before(n, sidecar)`` ahead of the n-th compile; returns the compiling threads."""
    threads: list[str] = []

    def compile_(sidecar: Sidecar, *args: Any, **kwargs: Any) -> SidecarIR:
        before(len(threads), sidecar)
        threads.append(threading.current_thread().name)
        return compile_sidecar(sidecar, *args, **kwargs)

    pipeline.compile = compile_
    return threads


async def test_the_loop_runs_while_a_sidecar_compiles(tmp_path: Path) -> None:
    pipeline, _ = _pipeline(tmp_path, 2)
    loop_ran = threading.Event()

    def wait_for_the_loop(n: int, sidecar: Sidecar) -> None:
        # On the loop this would deadlock: the task that sets the event could never run.
        assert loop_ran.wait(10), "the event loop did not run while a sidecar compiled"

    threads = _paced(pipeline, wait_for_the_loop)

    async def on_the_loop() -> None:
        await asyncio.sleep(0.01)
        loop_ran.set()

    task = asyncio.create_task(on_the_loop())
    await pipeline.rebuild_async()
    await task
    assert len(threads) == 2 and threading.main_thread().name not in threads
    assert pipeline.cache.node_ids() == ["node-0", "node-1"] and pipeline.rebuilds == 1
    assert pipeline.errors == {}


async def test_the_first_sidecars_are_published_while_the_rest_compile(tmp_path: Path) -> None:
    pipeline, _ = _pipeline(tmp_path, 10)
    first = threading.Event()
    pipeline.cache.watch("node-0", lambda _snapshot: first.set())
    published_meanwhile: list[list[str]] = []

    def after_four(n: int, sidecar: Sidecar) -> None:
        # By now the first four were handed over (in one chunk of ``batch``, or sooner when
        # PUBLISH_INTERVAL passed): wait until the loop has published the first of them.
        if n == 4:
            assert first.wait(10), "the first sidecars were not published meanwhile"
            published_meanwhile.append(pipeline.cache.node_ids())

    threads = _paced(pipeline, after_four)
    await pipeline.rebuild_async(batch=4)
    assert len(threads) == 10 and len(pipeline.cache.node_ids()) == 10
    assert published_meanwhile and 1 <= len(published_meanwhile[0]) <= 4
    assert pipeline.rebuilds == 1


async def test_a_rebuild_compiles_the_inputs_it_started_with(tmp_path: Path) -> None:
    """The store changes while the worker compiles: the running rebuild finishes on the
    revision it took (no sidecar gets a mix), the next one compiles the new revision."""
    pipeline, files = _pipeline(tmp_path, 3)
    started = pipeline.store.current().revision
    edited = threading.Event()
    loop = asyncio.get_running_loop()

    def edit_meanwhile(n: int, sidecar: Sidecar) -> None:
        if n == 1:
            (tmp_path / "access.yaml").write_text(ACCESS.format(path="/v2/predict"))
            asyncio.run_coroutine_threadsafe(asyncio.to_thread(files.sync), loop).result(10)
            edited.set()

    _paced(pipeline, edit_meanwhile)
    await pipeline.rebuild_async()
    assert edited.is_set() and pipeline.store.current().revision == started + 1
    assert pipeline.compiled_revision == started
    paths = {str(pipeline.ir(f"node-{i}")).count("/v2/predict") for i in range(3)}
    assert paths == {0}  # every sidecar from the old revision, none half-way
    await pipeline.rebuild_async()
    assert pipeline.compiled_revision == started + 1
    assert all("/v2/predict" in str(pipeline.ir(f"node-{i}")) for i in range(3))


async def test_a_newer_rebuild_supersedes_a_running_one(tmp_path: Path) -> None:
    pipeline, files = _pipeline(tmp_path, 4)
    release = threading.Event()
    compiling = threading.Event()

    def hold_the_first(n: int, sidecar: Sidecar) -> None:
        if n == 0:
            compiling.set()
            assert release.wait(10)

    threads = _paced(pipeline, hold_the_first)
    first = asyncio.create_task(pipeline.rebuild_async(batch=1))
    assert await asyncio.to_thread(compiling.wait, 10)
    (tmp_path / "access.yaml").write_text(ACCESS.format(path="/v3/predict"))
    files.sync()
    second = asyncio.create_task(pipeline.rebuild_async(batch=1))
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(first, second)
    # The first stopped after its sidecar in hand; only the second published, in full.
    assert pipeline.rebuilds == 1
    assert pipeline.compiled_revision == pipeline.store.current().revision
    assert all("/v3/predict" in str(pipeline.ir(f"node-{i}")) for i in range(4))
    assert len(threads) == 1 + 4


async def test_a_sidecar_whose_compile_fails_keeps_its_last_snapshot(tmp_path: Path) -> None:
    pipeline, files = _pipeline(tmp_path, 3)
    await pipeline.rebuild_async()
    before = pipeline.cache.get("node-1")
    assert before is not None

    def fail_node_1(n: int, sidecar: Sidecar) -> None:
        if sidecar.node_id == "node-1":
            raise RuntimeError("a bug in a compile module")

    _paced(pipeline, fail_node_1)
    (tmp_path / "access.yaml").write_text(ACCESS.format(path="/v2/predict"))
    files.sync()
    await pipeline.rebuild_async()
    assert pipeline.cache.get("node-1") is before
    assert "a bug in a compile module" in pipeline.errors["node-1"]
    assert "/v2/predict" in str(pipeline.ir("node-0")) and "/v2/predict" in str(
        pipeline.ir("node-2")
    )
    pipeline.compile = compile_sidecar  # fixed: it catches up on the next rebuild
    await pipeline.rebuild_async()
    assert pipeline.errors == {} and "/v2/predict" in str(pipeline.ir("node-1"))


async def test_close_stops_a_running_rebuild(tmp_path: Path) -> None:
    pipeline, _ = _pipeline(tmp_path, 3)
    release, compiling = threading.Event(), threading.Event()

    def hold(n: int, sidecar: Sidecar) -> None:
        compiling.set()
        assert release.wait(10)

    threads = _paced(pipeline, hold)
    running = asyncio.create_task(pipeline.rebuild_async())
    assert await asyncio.to_thread(compiling.wait, 10)
    pipeline.close()
    release.set()
    await asyncio.wait_for(running, 10)
    assert len(threads) == 1 and pipeline.rebuilds == 0 and pipeline.cache.node_ids() == []


async def test_memory_returns_after_a_big_policy_file_is_removed(tmp_path: Path) -> None:
    """Nothing of a removed file stays behind: not in the store, not in the IRs, the shape
    cache or the interned resources (held weakly, by live snapshots only). Measured with
    tracemalloc (what Python allocated), not RSS (which the allocator may keep)."""
    import gc
    import tracemalloc

    from bench.rebuild_stall import big_unit
    from controlplane.xds import snapshot as snapshots

    pipeline, _ = _pipeline(tmp_path, 3)
    unit = "big.yaml"

    async def cycle() -> int:
        """Apply the big file, rebuild, remove it, rebuild; the memory it took at its peak."""
        pipeline.store.apply({unit: big_unit(3, 1_000, ["digits-model"], unit)})
        await pipeline.rebuild_async()
        assert "/v1/predict/999" in str(pipeline.ir("node-0"))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        pipeline.store.apply({}, removed=[unit])
        await pipeline.rebuild_async()
        assert "/v1/predict/999" not in str(pipeline.ir("node-0"))
        return held

    await pipeline.rebuild_async()
    await cycle()  # first use: imports, interned strings, lazily built tables
    tracemalloc.start()  # traces what is allocated from here on
    try:
        gc.collect()
        baseline = tracemalloc.get_traced_memory()[0]
        interned = len(snapshots._interned)
        held = await cycle()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    mb = 1024 * 1024
    assert held - baseline > 4 * mb, (held - baseline) / mb  # the file was big
    assert after - baseline < (held - baseline) * 0.02, ((after - baseline) / mb, held / mb)
    assert len(snapshots._interned) == interned
    assert len(pipeline.shapes._templates) <= 3


async def test_edits_during_a_rebuild_coalesce_into_one_more_with_the_newest(
    tmp_path: Path,
) -> None:
    """Through the server's Debouncer: one rebuild in flight, at most one pending, and the
    pending one compiles the newest policies (the edits in between are never compiled)."""
    from controlplane.pipeline import Debouncer

    pipeline, files = _pipeline(tmp_path, 2)
    await pipeline.rebuild_async()
    release, compiling = threading.Event(), threading.Event()

    def hold_the_first(n: int, sidecar: Sidecar) -> None:
        if n == 0:
            compiling.set()
            assert release.wait(10)

    threads = _paced(pipeline, hold_the_first)
    debouncer = Debouncer(
        pipeline.rebuild_async, asyncio.get_running_loop(), quiet=0.01, max_delay=0.05
    )
    pipeline.store.subscribe(lambda _policies: debouncer.trigger())
    (tmp_path / "access.yaml").write_text(ACCESS.format(path="/v2/predict"))
    files.sync()
    assert await asyncio.to_thread(compiling.wait, 10)
    for version in (3, 4, 5):  # while the first runs
        (tmp_path / "access.yaml").write_text(ACCESS.format(path=f"/v{version}/predict"))
        files.sync()
        await asyncio.sleep(0.03)
    release.set()
    newest = pipeline.store.current().revision
    for _ in range(500):
        if pipeline.compiled_revision == newest:
            break
        await asyncio.sleep(0.01)
    assert pipeline.compiled_revision == newest
    assert pipeline.rebuilds == 1 + 2  # the first one, the held one, one more: coalesced
    assert "/v5/predict" in str(pipeline.ir("node-0")) and len(threads) == 2 + 2

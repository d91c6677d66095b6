"""The extraction-risk estimate's cost in the monitor: CPU per query with it on and off.

In one process (no gRPC, no other servers: on a shared machine a steadier figure than
throughput.py's), the same recorded feed is folded into a fresh ``ExtractionMonitor`` with
the estimate off and on, alternately, ``--rounds`` times. The traffic is the worst case
for the estimate: every query distinct (natural digits, a few pixels nudged), 128 queries
per batch over ``--clients`` clients.

    .venv/bin/python bench/extraction/risk_cost.py [--rounds 9] [--batches 160] [--clients 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.api import parse_documents  # noqa: E402
from controlplane.extraction.feed import ProfileBook, one_blas_thread  # noqa: E402
from controlplane.extraction.monitor import ExtractionMonitor, WatchedPolicy  # noqa: E402
from controlplane.extraction.risk import held_out_of  # noqa: E402
from controlplane.extraction.verdicts import InMemoryVerdictSink, VerdictStore  # noqa: E402
from controlplane.gen.modelguard.feed.v1 import feed_pb2  # noqa: E402
from controlplane.local.model import load_model  # noqa: E402

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
  detection:
    reference: {file: REFERENCE, labelColumn: label}
""".replace("REFERENCE", str(ROOT / "policies" / "digits-reference.csv"))


def feed(batches: int, clients: int) -> list[feed_pb2.FeedBatch]:
    model = load_model(0)
    rng = np.random.default_rng(0)
    pool = np.concatenate([model.train_X, model.test_X])
    n = 128 * batches
    nudged = rng.integers(-1, 2, (n, 64)) * (rng.random((n, 64)) < 0.05)
    rows = np.clip(pool[rng.integers(0, len(pool), n)] + nudged, 0, 16)
    scores = model.predict_proba(rows)
    out = []
    for start in range(0, n, 128):
        batch = feed_pb2.FeedBatch(node_id="bench", policy="demo/digits-model")
        for i in range(start, start + 128):
            batch.queries.add(
                client_key=f"client-{i % clients}",
                status=200,
                request_body=json.dumps({"instances": [rows[i].tolist()]}).encode(),
                response_body=json.dumps(
                    {"predictions": [{"probabilities": scores[i].tolist()}]}
                ).encode(),
            )
        out.append(batch)
    return out


def cpu_per_query(
    batches: list[feed_pb2.FeedBatch], book: ProfileBook, policies: list[Any], estimate: bool
) -> float:
    monitor = ExtractionMonitor(
        lambda: policies,
        VerdictStore(),
        InMemoryVerdictSink(),
        profile=book,
        held_out=held_out_of if estimate else (lambda profile: None),
        max_clients=4096,
    )
    monitor.report(batches[0])  # profile and held-out rows loaded before the clock starts
    started = time.process_time()
    for batch in batches[1:]:
        monitor.report(batch)
    return (time.process_time() - started) / (128 * (len(batches) - 1)) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batches", type=int, default=160)
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args()
    one_blas_thread()
    batches = feed(args.batches, args.clients)
    loaded, violations = parse_documents(POLICY, "bench")
    assert not violations, violations
    policies = [lp.policy for lp in loaded]
    book = ProfileBook()  # the policy's profile, calibrated once before any clock starts
    watched = WatchedPolicy.of(policies[0])
    assert watched is not None
    book(watched)
    book.wait(watched.key)
    off: list[float] = []
    on: list[float] = []
    for _ in range(args.rounds):
        off.append(cpu_per_query(batches, book, policies, estimate=False))
        on.append(cpu_per_query(batches, book, policies, estimate=True))
    m_off, m_on = statistics.median(off), statistics.median(on)
    print(f"monitor CPU per query, {args.batches} batches of 128 over {args.clients} clients, "
          f"every query distinct, {args.rounds} rounds")
    print(f"  estimate off: {m_off:.1f} µs (median; {min(off):.1f}-{max(off):.1f})")
    print(f"  estimate on:  {m_on:.1f} µs (median; {min(on):.1f}-{max(on):.1f})")
    print(f"  on/off: {m_on / m_off:.3f} (throughput {m_off / m_on - 1:+.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

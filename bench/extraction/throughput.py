"""How many queries per second the extraction monitor folds in, on one core.

Batches as the sidecar ships them (128 queries, JSON bodies as the demo model's API
takes and answers them), spread over N clients; the figure includes JSON parsing,
feature extraction and all four detectors. Baseline: the same batches through a no-op
``report`` (parsing the protobuf only), measured in the same run.

    .venv/bin/python bench/extraction/throughput.py [--clients 100] [--batches 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.api import parse_documents  # noqa: E402
from controlplane.extraction.feed import default_profile  # noqa: E402
from controlplane.extraction.monitor import ExtractionMonitor  # noqa: E402
from controlplane.extraction.verdicts import InMemoryVerdictSink, VerdictStore  # noqa: E402
from controlplane.gen.modelguard.feed.v1 import feed_pb2  # noqa: E402
from controlplane.local.model import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from run import POLICY  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    model = load_model(0)
    loaded, _ = parse_documents(POLICY, "bench")
    policies = [lp.policy for lp in loaded]
    monitor = ExtractionMonitor(
        lambda: policies, VerdictStore(), InMemoryVerdictSink(), profile=default_profile
    )
    rng = np.random.default_rng(0)
    batches = []
    for b in range(args.batches):
        batch = feed_pb2.FeedBatch(policy="demo/digits-model")
        rows = model.test_X[rng.integers(0, len(model.test_X), 128)]
        proba = model.predict_proba(rows)
        for i, (row, p) in enumerate(zip(rows, proba, strict=True)):
            batch.queries.add(
                client_key=f"client-{(b * 128 + i) % args.clients}",
                request_body=json.dumps({"instances": [row.tolist()]}).encode(),
                response_body=json.dumps(
                    {"predictions": [{"label": int(p.argmax()), "probabilities": p.tolist()}]}
                ).encode(),
            )
        batches.append(batch.SerializeToString())
    started = time.perf_counter()
    for raw in batches:
        feed_pb2.FeedBatch.FromString(raw)
    baseline = time.perf_counter() - started
    started = time.perf_counter()
    for raw in batches:
        monitor.report(feed_pb2.FeedBatch.FromString(raw))
    elapsed = time.perf_counter() - started
    n = args.batches * 128
    print(json.dumps({
        "queries": n, "clients": args.clients,
        "monitor_queries_per_second": round(n / elapsed),
        "decode_only_queries_per_second": round(n / baseline),
        "ratio_to_decode_only": round(baseline / elapsed, 4),
        "false_positives": len(monitor.verdicts.active()),
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

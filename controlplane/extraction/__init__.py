"""The extraction monitor: the query feed from sidecars, per-client detectors, verdicts.

sidecars ── QueryFeed.Report (batched, off the request path) ──► monitor ──► detectors
    ──► verdicts (alert → throttle → quarantine) ──► VerdictStore ──► compile (RBAC deny,
    per-client rate limit) ──► xDS. Every verdict is also an OpenTelemetry log record.
"""

"""Telemetry: the OTLP receiver for the sidecars' traces and access logs, a bounded store of
recent records, forwarding to a user's OTLP endpoint, and the control plane's own spans and
metrics (opentelemetry-sdk).

Kept import-light: compile reads ``settings`` from here; the servers live in submodules.
"""

"""Workload identity: CA, SVID issuance and rotation, sidecar authentication, API keys."""

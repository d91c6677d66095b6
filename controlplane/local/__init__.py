"""The embedded default: real Envoy processes, the demo model API, demo clients."""

"""Wire contracts: names two ends agree on when one of ours writes them into a sidecar's
configuration (or bootstrap) and another of ours reads them back off the wire. Each lives in
one module that both ends import, and a test (tests/unit/test_wire_contracts.py) drives the
producer's output through the consumer."""

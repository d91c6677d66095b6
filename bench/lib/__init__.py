"""Helpers shared by the data-path benchmarks: static Envoys and a wrk driver."""

"""Fixtures of the xDS tests (defined in xds_helpers, which the tests import by that name)."""

from xds_helpers import ads, on_connect

__all__ = ["ads", "on_connect"]

"""Portvakt: a reverse-proxy security gateway (policy enforcement point)."""

__version__ = "0.1.0"

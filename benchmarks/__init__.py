"""Benchmarks (not part of the installed package); run them with ``python -m benchmarks.<name>``."""

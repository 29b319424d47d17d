"""Benchmarks for the Z-Image platform: ``python -m bench <benchmark>`` (see bench/README.md).

A plain folder rather than part of the package: benchmarks measure the platform from outside,
through its public API, and never ship in the wheel.
"""

"""Throughput benchmarks: each script prints a table and writes JSON (python -m benchmarks.NAME)."""

"""Kernel and end-to-end benchmarks: `python -m benchmarks.<name>`; the last line printed is JSON."""

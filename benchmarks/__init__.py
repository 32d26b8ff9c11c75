"""Benchmarks: each module here is a standalone script that prints its figures."""

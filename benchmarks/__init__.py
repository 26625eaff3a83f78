"""Benchmarks behind BENCHMARKS.md: each module prints its figures with the command that made
them."""

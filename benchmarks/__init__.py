"""Benchmarks behind BENCHMARKS.md: each module prints the figures with the command that made them."""

"""Benchmarks and evaluation protocols: retrieval metrics, probes, invariance, speed, reports."""

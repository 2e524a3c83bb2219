"""Throughput, MFU, memory and communication benchmarks of gan_dist (see docs/benchmarks.md)."""

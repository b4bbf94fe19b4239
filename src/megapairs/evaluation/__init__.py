"""Evaluation: CIRCO, CIRR, FashionIQ, GeneCIS and MMEB with the benchmarks' own metrics."""

"""Measuring and showing MSDA: benchmarks, cost profiles, attention maps."""

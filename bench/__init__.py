"""Benchmarks and data preparation; product code never imports this package."""

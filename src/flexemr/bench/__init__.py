"""Benchmark drivers: run flexemr and its baselines under MLPerf LoadGen."""

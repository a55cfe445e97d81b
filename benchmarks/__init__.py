"""Benchmarks: runner, targets, device profiles, roofline projection, peers, reports."""

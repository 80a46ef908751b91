"""Benchmarks that print and save JSON figures (`streamgen bench …`)."""

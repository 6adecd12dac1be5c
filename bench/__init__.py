"""Benchmarks of regmirror on real components (not tests: they assert nothing; their figures are for people)."""

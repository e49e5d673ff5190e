"""Benchmarks of celery-gpu (not part of the installed package); see benchmarks/README.md."""

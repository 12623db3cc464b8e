"""Benchmarks of disconnect-responses against Starlette; see README.md. Never collected by pytest."""

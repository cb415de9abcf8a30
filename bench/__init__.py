"""Benchmarks of the assistant worker on the local stack (`make bench`, `python -m bench [--quick]`).

Everything runs on this machine: a dedicated embedded PostgreSQL cluster in a temporary folder,
the Replicate simulator in its own process, the worker as `python -m worker run` processes. The
report is written to bench/results/report.json and bench/results/report.png (see README.md)."""

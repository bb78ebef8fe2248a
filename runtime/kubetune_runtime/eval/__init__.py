"""Evaluation: metrics (pure) and the harness that runs suites on a model."""

"""Reporting: a run's result as files: tables (results.csv, results.md, averages.csv), scores.npz, plots, and the
provenance recorded in config.yaml."""

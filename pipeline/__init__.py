"""The experiment pipeline: typed config -> datasets -> backbone -> cached features -> detectors -> report."""

"""Offline tools on finished runs: `python -m pipeline.tools.aggregate` (the paper's tables from many runs) and
`python -m pipeline.tools.compare` (paired bootstrap comparison of two detectors of one run)."""

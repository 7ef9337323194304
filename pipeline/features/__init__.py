"""Features: every image decoded and forwarded once per model (extract), kept in the on-disk cache (cache), shared
out over torchrun ranks (distributed); models that ship no weights are trained at start-up (training)."""

"""Running: one experiment from a resolved config to a typed result (experiment), and sweeps over a key (sweep)."""

"""Configuration: YAML files under configs/ parsed into typed dataclasses, merged with command-line flags and
`--set` overrides, and checked once before any image is read."""

"""Specs, loaded from YAML, a dict or CLI flags, validated once at the edge: `RunSpec` (one
training run, run.py), `SweepSpec` (a search over RunSpecs, sweep.py), and the value parsing both
share (values.py). Inner code trusts a validated spec."""

from raydist.config.run import RunSpec
from raydist.config.sweep_file import SweepSpec, load_sweep
from raydist.config.values import load_yaml, parse_sets
from raydist.errors import ConfigError

__all__ = ["ConfigError", "RunSpec", "SweepSpec", "load_sweep", "load_yaml", "parse_sets"]

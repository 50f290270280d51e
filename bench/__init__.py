"""Benchmarks: each writes JSON under bench/results/ and, where a picture helps, a PNG under
docs/benchmarks/. Run one with `infergate bench NAME [flags]` (infergate/cli.py names them)."""

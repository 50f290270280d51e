"""`infergate bench pd`: prefill/decode disaggregation against aggregated serving on the same
simulated fleet and workload (see cli.py)."""

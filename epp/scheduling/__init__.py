"""Scheduling: profiles of filters, weighted scorers and a picker, configured by YAML."""

"""Our CRDs and the upstream ones, shipped as package data (stack/resources.py)."""

"""The example directories `infergate up` runs, shipped as package data (stack/resources.py)."""

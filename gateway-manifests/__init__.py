"""The cluster manifests and the local Envoy template, shipped as package data
(stack/resources.py)."""

"""Fixtures the controllers' tests share."""

from tests.picker_cluster import cluster  # noqa: F401  (the fixture: a namespace in the emulator)

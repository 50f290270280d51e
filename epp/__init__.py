"""epp — see README.md; filled in by later issues."""

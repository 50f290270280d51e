"""Hypothesis strategies for Kubernetes object names, for the tests of names derived from them
(tests/api/test_object_names.py, tests/controllers/test_long_names.py)."""

from __future__ import annotations

from hypothesis import strategies as st

DNS_LABEL_PART = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"


@st.composite
def subdomains(draw) -> str:
    """A valid DNS-1123 subdomain of 1 to 253 characters, long ones as likely as short."""
    parts = draw(st.lists(st.from_regex(DNS_LABEL_PART, fullmatch=True), min_size=1, max_size=8))
    sep = draw(st.sampled_from([".", "-"]))  # dots make it a subdomain, not a DNS label
    name = sep.join(parts)
    if draw(st.booleans()):  # stretch it past every limit
        name = (name + sep) * (253 // (len(name) + 1) + 1)
    name = name[: draw(st.integers(1, 253))].rstrip("-.")
    return name or "a"

"""api/object_names.py: names derived from a Model's name fit what the API server accepts, stay
as they were for short names, and keep long names apart. The patterns below are Kubernetes'
own (apimachinery's validation), written out here rather than taken from the module."""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st

from infergw.api.object_names import dns_label, label_value, name_hash, subdomain
from tests.name_strategies import subdomains

SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def valid_subdomain(name: str) -> bool:
    return len(name) <= 253 and SUBDOMAIN.fullmatch(name) is not None


def valid_service_name(name: str) -> bool:
    return len(name) <= 63 and DNS_1035.fullmatch(name) is not None


def valid_label_value(value: str) -> bool:
    return len(value) <= 63 and LABEL_VALUE.fullmatch(value) is not None


def test_short_names_are_left_as_they_were() -> None:
    assert subdomain("llama", "-epp-config") == "llama-epp-config"
    assert dns_label("llama", "-epp-replicas") == "llama-epp-replicas"
    assert label_value("llama-3-8b", "-0") == "llama-3-8b-0"
    assert label_value("a" * 63) == "a" * 63


def test_a_long_name_is_cut_with_a_hash_of_the_whole_and_keeps_its_suffix() -> None:
    name = "m" * 60
    got = dns_label(name, "-epp-replicas")
    assert len(got) == 63 and got.endswith(f"-{name_hash(name + '-epp-replicas')}-epp-replicas")
    assert valid_service_name(got)
    assert label_value("a" * 64) == f"{'a' * 54}-{name_hash('a' * 64)}"


def test_names_that_share_the_kept_prefix_still_differ() -> None:
    a, b = "x" * 70 + "-one", "x" * 70 + "-two"
    assert dns_label(a, "-epp") != dns_label(b, "-epp")
    assert label_value(a) != label_value(b)


def test_a_service_name_starts_with_a_letter_and_has_no_dots() -> None:
    assert valid_service_name(dns_label("7b-model", "-epp"))
    assert valid_service_name(dns_label("llama.v3", "-epp"))
    # a.b and a-b are different Models: their Services must differ too
    assert dns_label("llama.v3", "-epp") != dns_label("llama-v3", "-epp") == "llama-v3-epp"


@given(subdomains(), st.sampled_from(["", "-epp", "-epp-replicas", "-0", "-12-decode-3-1"]))
@example("a" * 253, "-epp-replicas")
@example("0" * 253, "-epp")
@example("a." * 126 + "b", "-epp-config")
@example("a" * 50, "-epp-replicas")
def test_every_derived_name_is_valid_stable_and_keeps_its_suffix(name: str, suffix: str) -> None:
    assert valid_subdomain(name)
    for derive, valid in (
        (subdomain, valid_subdomain),
        (dns_label, valid_service_name),
        (label_value, valid_label_value),
    ):
        got = derive(name, suffix)
        assert valid(got), (derive.__name__, got)
        assert got.endswith(suffix) and got == derive(name, suffix)
    assert valid_subdomain(label_value(name, suffix))  # PodGroups are named by the group label

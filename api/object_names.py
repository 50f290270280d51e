"""Names the controllers derive from an object's name (a Model's may be 253 characters), kept
within what the API server accepts for the derived object: a DNS-1123 subdomain (most objects,
253), a DNS-1035 label (Services: 63, starting with a letter) or a label value (63).

As Kubernetes' own controllers do, a derived name that does not fit is truncated and given a
short stable hash of the whole name it stands for, so two long names sharing a prefix still
differ; a name that fits is left as it is (a short Model's objects keep their names). A fixed
suffix (`-epp`, a group's `-3`) is kept at the end, so code that reads it back still can.
"""

from __future__ import annotations

import hashlib
import re

SUBDOMAIN_MAX = 253
LABEL_MAX = 63  # a DNS label, and a label value
HASH_CHARS = 8  # 32 bits of sha256: what keeps truncated names apart
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
NOT_DNS_1035 = re.compile(r"[^-a-z0-9]")
# Put before a DNS-1035 label whose source starts with a digit: a Service must start with a letter.
LETTER_PREFIX = "x"


def name_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def _fit(base: str, suffix: str, limit: int, whole: str, altered: bool = False) -> str:
    """base + suffix if that fits in `limit` and base is as given; else the longest head of
    base that fits, '-', the hash of `whole`, then suffix."""
    if not altered and len(base) + len(suffix) <= limit:
        return base + suffix
    tag = name_hash(whole)
    head = base[: max(0, limit - len(suffix) - len(tag) - 1)].rstrip("-.")
    return f"{head}-{tag}{suffix}" if head else f"{tag}{suffix}"


def subdomain(base: str, suffix: str = "") -> str:
    """A derived object name (ConfigMap, Secret, Deployment, Pod…) from a valid subdomain."""
    return _fit(base, suffix, SUBDOMAIN_MAX, base + suffix)


def label_value(base: str, suffix: str = "") -> str:
    """A label value naming an object (a subdomain): at most 63 characters."""
    return _fit(base, suffix, LABEL_MAX, base + suffix)


def dns_label(base: str, suffix: str = "") -> str:
    """A Service name: a DNS-1035 label of at most 63 characters. A subdomain's dots become
    dashes and a leading digit gets LETTER_PREFIX, with the hash then always added, so `a.b`
    and `a-b` never meet."""
    whole = base + suffix
    if len(whole) <= LABEL_MAX and DNS_1035.fullmatch(whole):
        return whole
    clean = NOT_DNS_1035.sub("-", base.lower())
    altered = clean != base
    if not clean[:1].isalpha():
        clean, altered = LETTER_PREFIX + clean, True
    return _fit(clean, suffix, LABEL_MAX, whole, altered)

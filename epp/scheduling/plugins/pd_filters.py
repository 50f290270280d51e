"""decode-filter and prefill-filter: keep the pods of one prefill/decode role.

A pod's role is its `infergate.io/role` label (parameter `label`): `prefill`, `decode`, or
`both` (a pod that does either, so both filters keep it). decode-filter also keeps pods
without the label (parameter `allowUnlabeled`, default true): a plain model server decodes,
and one that gets x-prefiller-host-port without a sidecar just serves the whole request.
prefill-filter keeps unlabelled pods only when told to (default false).
"""

from __future__ import annotations

from epp.scheduling.framework import Filter

ROLE_LABEL = "infergate.io/role"
BOTH = "both"


class _RoleFilter(Filter):
    role = ""
    unlabeled_default = False

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self.label = self.params.get("label", ROLE_LABEL)
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"{self.type_name}: label must be a non-empty string")
        allow = self.params.get("allowUnlabeled", self.unlabeled_default)
        if not isinstance(allow, bool):
            raise ValueError(f"{self.type_name}: allowUnlabeled must be true or false")
        self.allow_unlabeled = allow
        self.values = frozenset((self.role, BOTH))

    def filter(self, req, endpoints):
        label, values, allow = self.label, self.values, self.allow_unlabeled
        out = []
        for e in endpoints:
            role = e.labels.get(label)
            if role in values or (role is None and allow):
                out.append(e)
        return out


class DecodeFilter(_RoleFilter):
    type_name = "decode-filter"
    role = "decode"
    unlabeled_default = True


class PrefillFilter(_RoleFilter):
    type_name = "prefill-filter"
    role = "prefill"
    unlabeled_default = False

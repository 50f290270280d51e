"""decode-filter and prefill-filter: keep the pods of one prefill/decode role.

A pod's role is its `infergate.io/role` label (parameter `label`): `prefill`, `decode`, or
`both` (a pod that does either, so both filters keep it). decode-filter also keeps pods
without the label (parameter `allowUnlabeled`, default true): a plain model server decodes,
and one that gets x-prefiller-host-port without a sidecar just serves the whole request.
prefill-filter keeps unlabelled pods only when told to (default false).
"""

from __future__ import annotations

from infergw.api.names import BOTH, DECODE, PREFILL, ROLE_LABEL
from infergw.epp.scheduling.framework import Filter
from infergw.epp.scheduling.params import Label, PluginParams, parse_params


class RoleFilterParams(PluginParams):
    label: Label = ROLE_LABEL
    allow_unlabeled: bool | None = None  # None: the filter's own default


class _RoleFilter(Filter):
    params_type = RoleFilterParams
    role = ""
    unlabeled_default = False

    def __init__(self, name, params=None):
        super().__init__(name, params)
        p = parse_params(self.params_type, self.params)
        self.label = p.label
        self.allow_unlabeled = (
            self.unlabeled_default if p.allow_unlabeled is None else p.allow_unlabeled
        )
        self.values = frozenset((self.role, BOTH))

    def filter(self, ctx, endpoints):
        label, values, allow = self.label, self.values, self.allow_unlabeled
        out = []
        for e in endpoints:
            role = e.labels.get(label)
            if role in values or (role is None and allow):
                out.append(e)
        return out


class DecodeFilter(_RoleFilter):
    type_name = "decode-filter"
    role = DECODE
    unlabeled_default = True


class PrefillFilter(_RoleFilter):
    type_name = "prefill-filter"
    role = PREFILL
    unlabeled_default = False

"""decode-filter and prefill-filter: keep the pods of one prefill/decode role.

A pod's role (epp.scheduling.plugins.pd_roles) comes from the request's ModelServer's
`pdGroup.prefillLabels` / `decodeLabels` when it has them, else from one label (parameter
`label`, `infergate.io/role`): `prefill`, `decode`, or `both` (a pod that does either, so both
filters keep it). decode-filter also keeps unlabelled pods (parameter `allowUnlabeled`, default
true): a plain model server decodes, and one that gets x-prefiller-host-port without a sidecar
just serves the whole request. prefill-filter keeps unlabelled pods only when told to (default
false).
"""

from __future__ import annotations

from infergw.api.names import ROLE_LABEL
from infergw.epp.scheduling.framework import Filter
from infergw.epp.scheduling.params import Label, PluginParams, parse_params
from infergw.epp.scheduling.plugins.pd_roles import Roles, roles_for


class RoleFilterParams(PluginParams):
    label: Label = ROLE_LABEL
    allow_unlabeled: bool | None = None  # None: the filter's own default


class _RoleFilter(Filter):
    params_type = RoleFilterParams
    unlabeled_default = False

    def __init__(self, name, params=None):
        super().__init__(name, params)
        p = parse_params(self.params_type, self.params)
        self.label = p.label
        self.allow_unlabeled = (
            self.unlabeled_default if p.allow_unlabeled is None else p.allow_unlabeled
        )

    def plays(self, roles: Roles, endpoint) -> bool:
        raise NotImplementedError

    def filter(self, ctx, endpoints):
        roles, allow = roles_for(ctx, self.label), self.allow_unlabeled
        return [e for e in endpoints if self.plays(roles, e) or (allow and roles.unlabelled(e))]


class DecodeFilter(_RoleFilter):
    type_name = "decode-filter"
    unlabeled_default = True

    def plays(self, roles, endpoint):
        return roles.is_decode(endpoint)


class PrefillFilter(_RoleFilter):
    type_name = "prefill-filter"
    unlabeled_default = False

    def plays(self, roles, endpoint):
        return roles.is_prefill(endpoint)

"""Which prefill/decode role a pod plays for one request.

The request's ModelServer decides when it has a `workloadSelector.pdGroup`: a pod is a prefill
pod when it carries every label of `prefillLabels`, a decode pod when it carries every label of
`decodeLabels`. Otherwise one label does (the filters' `label` parameter, `infergate.io/role`
by default) with the values `prefill` and `decode`. Either way a label whose value is `both`
(llm-d's convention) counts for either role, and a pod may play both. A pod with none of the
role labels' keys is "unlabelled" (the filters' `allowUnlabeled` decides about it); one with a
key but other values plays no role.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from infergw.api.names import BOTH, DECODE, PREFILL
from infergw.epp.context import RequestContext
from infergw.epp.datastore import Endpoint


@dataclass(frozen=True, slots=True)
class Roles:
    """The labels that make a pod a prefill pod and those that make it a decode pod."""

    prefill: Mapping[str, str]
    decode: Mapping[str, str]

    @classmethod
    def by_label(cls, label: str) -> Roles:
        return cls({label: PREFILL}, {label: DECODE})

    def is_prefill(self, endpoint: Endpoint) -> bool:
        return _carries(endpoint, self.prefill)

    def is_decode(self, endpoint: Endpoint) -> bool:
        return _carries(endpoint, self.decode)

    def unlabelled(self, endpoint: Endpoint) -> bool:
        have = endpoint.labels
        return not any(key in have for key in (*self.prefill, *self.decode))


def _carries(endpoint: Endpoint, labels: Mapping[str, str]) -> bool:
    have = endpoint.labels
    return all(have.get(key) in (value, BOTH) for key, value in labels.items())


def roles_for(ctx: RequestContext | None, label: str) -> Roles:
    """The routed ModelServer's pdGroup labels, else `label` with prefill/decode values."""
    resolution = ctx.resolution if ctx is not None else None
    server = resolution.server if resolution is not None else None
    pd = server.spec.workload_selector.pd_group if server is not None else None
    if pd is None:
        return Roles.by_label(label)
    return Roles(pd.prefill_labels, pd.decode_labels)

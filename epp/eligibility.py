"""Which endpoints a request may use, computed one way for admission and for scheduling:
the ready endpoints, narrowed to the ext_proc subset hint, then to what its route chose (the
ModelServer's pods; for one of its LoRA adapters, those of them that have it loaded) or,
without a route, to the pods serving its model. Flow control asks
for the destinations among them again each time it checks for room, since the pool changes
while a request waits."""

from __future__ import annotations

from infergw.epp.context import RequestContext
from infergw.epp.datastore import Datastore, Endpoint
from infergw.epp.errors import NoCapacity, PickerError
from infergw.epp.routing.table import selects
from infergw.epp.scheduling.framework import ProfileHandler


class Eligibility:
    def __init__(self, datastore: Datastore, handler: ProfileHandler, subset_filter: bool) -> None:
        self.datastore = datastore
        self.handler = handler
        self.subset_filter = subset_filter

    def candidates(self, subset: list[str] | None) -> list[Endpoint]:
        """The ready endpoints, narrowed to the subset hint."""
        endpoints = self.datastore.ready_endpoints()
        if subset is None or not self.subset_filter:
            return endpoints
        if not subset:
            raise PickerError(503, "the endpoint subset hint is empty")
        # An ip:port names one endpoint; a bare IP (as the reference picker matches) a pod.
        addresses = {s for s in subset if ":" in s}
        ips = {s for s in subset if ":" not in s}
        chosen = [e for e in endpoints if e.address in addresses or e.ip in ips]
        if not chosen:
            raise PickerError(503, "no endpoint of the subset hint is in the pool")
        return chosen

    def endpoints(self, ctx: RequestContext) -> list[Endpoint]:
        """The ready endpoints the request may use now: of its subset hint, its ModelServer's
        (or all, when its route targets the pool), or without a route those serving its
        model. Raises PickerError when the model is not served at all, NoCapacity when
        nothing in the pool is ready (a pool scaled to zero: the request may wait)."""
        candidates = self.candidates(ctx.subset)
        resolution = ctx.resolution
        if resolution is None:
            chosen = self._serving(ctx.target_model, candidates)
        elif resolution.server is None:
            chosen = candidates
        else:
            chosen = [e for e in candidates if selects(resolution.server, e)]
        if resolution is not None and resolution.adapter:
            # The route names the adapter, but a pod serves it only once loaded (the runtime
            # sidecar loads it at run time; one pod may have it before another).
            chosen = self._holding(ctx.target_model, chosen)
        if not candidates:
            pool = self.datastore.pool.name if self.datastore.pool else "?"
            raise NoCapacity(f"no ready endpoint in pool {pool} for model {ctx.request.model!r}")
        return chosen

    def destinations(self, ctx: RequestContext) -> list[Endpoint]:
        """The endpoints that can be the request's destination, for flow control's saturation
        check: with prefill/decode picking, prefill pods never are (their room is no room for
        a decode)."""
        return self.handler.destinations(ctx, self.endpoints(ctx))

    def _serving(self, model: str, candidates: list[Endpoint]) -> list[Endpoint]:
        """Candidates that serve `model` (or whose models are not known yet)."""
        everyone = self.datastore.endpoints()
        if (
            everyone
            and all(e.models is not None for e in everyone)
            and not any(model in e.models for e in everyone)
        ):
            pool = self.datastore.pool.name if self.datastore.pool else "?"
            raise PickerError(404, f"model {model!r} is not served by pool {pool}")
        return self._holding(model, candidates)

    @staticmethod
    def _holding(model: str, candidates: list[Endpoint]) -> list[Endpoint]:
        """Candidates whose models include `model` (or are not known yet); 503 if there are
        candidates but none of them serves it."""
        serving = [e for e in candidates if e.models is None or model in e.models]
        if candidates and not serving:
            raise PickerError(503, f"no available endpoint serves model {model!r}")
        return serving

"""test-epp-endpoint-selection: a request header that restricts candidates (for tests and
conformance): a comma list of IPs or ip:port addresses."""

from __future__ import annotations

from infergw.epp.scheduling.framework import Filter

HEADER = "test-epp-endpoint-selection"


class HeaderBasedTestingFilter(Filter):
    type_name = "header-based-testing-filter"

    def filter(self, ctx, endpoints):
        value = ctx.request.headers.get(HEADER)
        if not value:
            return endpoints
        wanted = {v.strip() for v in value.split(",") if v.strip()}
        return [e for e in endpoints if e.address in wanted or e.ip in wanted]

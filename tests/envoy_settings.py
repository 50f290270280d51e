"""Settings of the local Envoy for tests that render its config without running a stack: two
pickers on fixed ports, one pod, FailOpen; keyword arguments change any field."""

from __future__ import annotations

from infergw.stack.envoy_config import EnvoySettings
from infergw.stack.ports import PickerPorts

PICKERS = [PickerPorts(19002, 19003, 19090, 19004), PickerPorts(19102, 19103, 19190, 19104)]


def local_envoy_settings(**kw) -> EnvoySettings:
    fields = dict(
        listen_port=18080,
        admin_port=19901,
        picker_host="127.0.0.1",
        pickers=PICKERS,
        picker_tls=False,
        failure_mode="FailOpen",
        endpoints=[("127.0.0.1", 18000)],
    )
    return EnvoySettings(**{**fields, **kw})

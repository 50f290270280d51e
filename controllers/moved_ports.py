"""A container's command line and env with its pod's ports moved (one-address mode,
api/pod_ports.py): where a pod cannot have an address of its own, its processes must bind other
ports than the manifest names, and a process learns its ports only from its arguments.

A port is moved where it is written as one: after a colon (`host:8000`, `tcp://*:5557`, a
KV-event topic `kv@$(POD_IP):8000@m`, a URL, JSON `"endpoint": "tcp://…:5557"`), as the value of
a flag whose name ends in `port` (`--port=8000`, `--port 8000`, `--kv-events-replay-port=5600`),
or as the whole value of an env variable whose name ends in `PORT`. Other numbers stay, so
`--max-model-len=8000` keeps its meaning.
"""

from __future__ import annotations

import re

from infergw.api.pod_ports import HostPorts

_PORT_FLAG = re.compile(r"--?[A-Za-z0-9_-]*port", re.IGNORECASE)


def moved_args(args: list[str], ports: HostPorts) -> list[str]:
    moved = ports.as_dict()
    if not moved:
        return list(args)
    written = re.compile(
        r"(?:(?<=:)|(?<=port=)|(?<=PORT=))(" + "|".join(map(str, moved)) + r")(?![0-9])"
    )
    out = []
    for i, arg in enumerate(args):
        if i > 0 and _PORT_FLAG.fullmatch(args[i - 1]) and arg.isdigit() and int(arg) in moved:
            out.append(str(moved[int(arg)]))  # `--port 8000`
        else:
            out.append(written.sub(lambda m: str(moved[int(m.group(1))]), arg))
    return out


def moved_env(env: dict[str, str], ports: HostPorts) -> dict[str, str]:
    moved = ports.as_dict()
    out = {}
    for name, value in env.items():
        if name.upper().endswith("PORT") and value.isdigit() and int(value) in moved:
            out[name] = str(moved[int(value)])
        else:
            out[name] = moved_args([value], ports)[0]
    return out

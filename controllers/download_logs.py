"""How far a pod's weights download is, in a cluster: the last lines of its `weights` init
container's log, read through the API server (`GET pods/NAME/log?container=weights&
tailLines=…&limitBytes=…`), for the ModelInfer's DownloadingWeights condition (standalone
mode reads the same lines from its runtime's log files).

Why the log and `get` on `pods/log` in the controllers' ClusterRole: the download already
writes a progress line there every 10 s, and the controllers already create and delete these
pods (which is more than reading their logs). The alternatives need more: the download
writing its progress into the pod's annotations would give every Model pod's ServiceAccount
`patch` on pods, and a ConfigMap per download a write grant in every Model's namespace. Only
the `weights` container is asked for (never the engine's, whose log may hold prompts), only
its last LOG_TAIL_LINES lines, and at most LOG_TAIL_BYTES; what comes back is read as the
hostile text it is (fetch/progress.py's `said`: the progress line's numbers, nothing else).
"""

from __future__ import annotations

import asyncio
import logging

from infergw.cluster.kube_store import KubeStore
from infergw.cluster.store import StoreError

log = logging.getLogger("controllers.download_logs")

LOG_TAIL_LINES = 4  # the progress line is logged every 10 s; a few others may follow it
LOG_TAIL_BYTES = 8192  # a progress line names a file (at most 1024 characters)


class PodLogs:
    """The controllers' ContainerLogs in a cluster (controllers/modelinfer.py)."""

    def __init__(self, store: KubeStore) -> None:
        self.store = store
        self._refused = False  # said once: an install without pods/log

    async def __call__(self, namespace: str, pod: str, container: str) -> str | None:
        """The end of the container's log; None when it cannot be read (not started yet,
        gone, or refused: the condition then says the container runs, without its bytes)."""
        try:
            return await asyncio.to_thread(self._read, namespace, pod, container)
        except StoreError as exc:
            if exc.code == 403 and not self._refused:
                self._refused = True
                log.warning(
                    "cannot read pod %s/%s's %s log, so the Model's status shows no download "
                    "progress: %s (the install's ClusterRole grants get on pods/log)",
                    namespace, pod, container, exc,
                )  # fmt: skip
            else:
                log.debug("log of %s/%s %s: %s", namespace, pod, container, exc)
            return None

    def _read(self, namespace: str, pod: str, container: str) -> str:
        return self.store.container_log_tail(
            namespace, pod, container, LOG_TAIL_LINES, LOG_TAIL_BYTES
        )

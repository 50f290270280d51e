"""Small datastores for the picker's tests."""

from __future__ import annotations

from infergw.epp.datastore import Datastore, PoolSpec


def one_pod_store(*ports: int) -> Datastore:
    """One ready pod on 127.0.0.1 in a pool with these target ports: an endpoint each."""
    ds = Datastore()
    ds.set_pool(PoolSpec("pool", "ns", {"app": "vllm"}, list(ports)))
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "vllm"}},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    ds.replace_pods([pod])
    return ds

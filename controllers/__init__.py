"""Level-triggered reconcilers for our CRDs (Model, ModelInfer, the autoscaling kinds).

`runner.py` runs informers → a rate-limited work queue → idempotent reconciles over one store
interface (`store.py`: the Kubernetes API in a cluster, `memory_store.py` in standalone mode,
where `local_runtime.py` runs pods as processes). `app.py` starts either mode.
"""

"""Where the picker learns about its InferencePool and the pods behind it."""


class KubernetesProviderError(RuntimeError):
    """The Kubernetes provider cannot serve the pool; the message says why. Here, not in
    providers/kubernetes.py, so the picker can name it without importing the Kubernetes
    client (two thirds of a second at every start that reads a pool file)."""

"""Objects from a Kubernetes API server or from memory: the store protocol, the Kubernetes store, the informer (list and watch), and an InferencePool's members."""

"""Where the picker learns about its InferencePool and the pods behind it."""

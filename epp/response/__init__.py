"""The answer on its way back to the client: usage, the usage event the picker asked for,
the model name the client asked for."""

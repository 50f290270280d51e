"""One module per plugin (or per small family); registry.py maps type names to them."""

"""infergate: the command line and the local stack that ties the parts together."""

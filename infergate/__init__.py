"""infergate: the launcher on top of the parts — the `infergate` command (cli.py) and
`infergate up` (up.py). The local stack it runs is the `stack` package, which never imports it.
api/ and engines.py, which the picker and controllers share, live here until they get a floor."""

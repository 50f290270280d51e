"""infergate: the launcher on top of the parts — the `infergate` command (cli.py) and
`infergate up` (up.py). The local stack it runs is the `stack` package, which never imports it."""

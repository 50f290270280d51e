"""tests/e2e/kind.sh's filter of `infergate install`'s stream: the objects whose apiVersion the
cluster serves (`kubectl api-versions`, one a line, in the file named by the one argument) go
to stdout; each other one is named on stderr, so a cluster without Envoy Gateway or
cert-manager still gets the controllers and our CRDs, and the script says what it left out.

    infergate install | python served_only.py served.txt | kubectl apply -f -
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import yaml


def split(docs: Iterable[dict | None], served: set[str]) -> tuple[list[dict], list[str]]:
    """(the documents the cluster serves, `kind name (apiVersion)` of each other one)."""
    kept, skipped = [], []
    for doc in docs:
        if not doc:
            continue
        if doc.get("apiVersion") in served:
            kept.append(doc)
        else:
            name = (doc.get("metadata") or {}).get("name", "")
            skipped.append(f"{doc.get('kind')} {name} ({doc.get('apiVersion')})")
    return kept, skipped


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: served_only.py API_VERSIONS_FILE < stream", file=sys.stderr)
        return 2
    served = {line.strip() for line in Path(argv[0]).read_text().splitlines() if line.strip()}
    kept, skipped = split(yaml.safe_load_all(sys.stdin), served)
    for what in skipped:
        print(f"not served by this cluster, left out: {what}", file=sys.stderr)
    yaml.safe_dump_all(kept, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Read the YAML an operator writes (pool files, EndpointPickerConfig, manifests) with bounds.

yaml.safe_load builds an alias as a second reference to one object, so a "billion laughs"
document (ten anchors each listing the previous one ten times) costs little to load but
expands to 10**9 values for anything that walks it: an error message quoting a value, a
null-pruning copy, str(). Such a document is refused here, as the Kubernetes API server's
YAML reader does, before anyone walks it. A file must also be a regular file of bounded
size: a FIFO or /dev/zero put in place of a pool file would otherwise block or fill the
reader for good.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

# Values a document may hold once its aliases are expanded: far above any real pool file
# (a thousand pods are ~50k), far below what makes a walk take seconds.
MAX_EXPANDED_NODES = 1_000_000
# Bytes a YAML file may hold; a real pool file or config is a few KiB to a few MiB.
MAX_FILE_BYTES = 16 * 1024 * 1024
# For the repository's own files only (the install's base, manifests the tests read), never
# an operator's: libyaml's parser, when PyYAML has it, builds the same objects ~10x faster
# than the pure-Python one, and the suite parses the manifests at every collection.
OWN_FILES_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlLimitError(yaml.YAMLError):
    """A document past the reader's bounds: aliases that expand past MAX_EXPANDED_NODES,
    nesting deeper than its recursion allows, an integer longer than Python converts."""


class YamlFileError(OSError):
    """A path that is not a regular file of at most MAX_FILE_BYTES."""


def expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has with every alias expanded: linear in the distinct
    nodes (each one's size is computed once), however far the aliases multiply them.
    A node that contains itself (an alias inside its own anchor) expands without end."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # expanded, children not yet summed: its ancestors
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if children_done or not children:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            open_nodes.discard(id(node))
            continue
        if id(node) in open_nodes:
            raise YamlLimitError("document holds an alias inside its own anchor: it never ends")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class _BoundedLoader(yaml.SafeLoader):
    def construct_document(self, node: yaml.Node) -> Any:
        size = expanded_size(node)
        if size > MAX_EXPANDED_NODES:
            raise YamlLimitError(
                f"document expands through its aliases (&anchor/*alias) to {size} values, "
                f"more than {MAX_EXPANDED_NODES}; write the values out instead"
            )
        return super().construct_document(node)


@contextmanager
def _bounded() -> Iterator[None]:
    """What PyYAML raises past its own bounds, as YamlLimitError (a yaml.YAMLError)."""
    try:
        yield
    except RecursionError:
        raise YamlLimitError("document nested too deeply") from None
    except ValueError as exc:  # "9" * 5000 as an int, a timestamp on the 13th month
        raise YamlLimitError(f"a value the reader cannot hold: {exc}") from None


def safe_load(text: str) -> Any:
    """yaml.safe_load, refusing documents past the bounds of YamlLimitError."""
    with _bounded():
        return yaml.load(text, Loader=_BoundedLoader)


def safe_load_all(text: str) -> list[Any]:
    """yaml.safe_load_all as a list, with the bounds of safe_load."""
    with _bounded():
        return list(yaml.load_all(text, Loader=_BoundedLoader))


def read_text(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    """The text of a regular file of at most `limit` bytes; YamlFileError otherwise.
    Opened without blocking, so a FIFO in its place is refused rather than waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise YamlFileError(f"{path} is not a regular file")
        too_large = info.st_size > limit  # refused unread
        if not too_large:
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(limit + 1)
            too_large = len(data) > limit  # it grew meanwhile
    finally:
        os.close(fd)
    if too_large:
        raise YamlFileError(f"{path} is larger than {limit} bytes")
    return data.decode()

"""`infergate up --pvc-root DIR --weights-cache-max-bytes SIZE` reach the standalone
controllers, which put them on the Models' downloads (controllers/weights.py)."""

from __future__ import annotations

from infergw.controllers.app import build_parser as controllers_parser
from infergw.stack.example import Example
from infergw.stack.local import weights_args
from infergw.up import build_parser, stack_config
from tests.paths import ROOT

QUICKSTART = ROOT / "examples" / "quickstart"


def test_up_passes_the_claims_root_and_the_cache_bound_to_the_controllers(tmp_path) -> None:
    argv = ["--pvc-root", str(tmp_path / "claims"), "--weights-cache-max-bytes", "2G"]
    cfg = stack_config(build_parser().parse_args(argv), Example.read(QUICKSTART), tmp_path)
    args = controllers_parser().parse_args(["--manifests", str(tmp_path), *weights_args(cfg)])
    assert args.pvc_root == (tmp_path / "claims").resolve()
    assert args.weights_cache_max_bytes == 2 << 30


def test_without_them_the_controllers_get_neither(tmp_path) -> None:
    cfg = stack_config(build_parser().parse_args([]), Example.read(QUICKSTART), tmp_path)
    assert weights_args(cfg) == []

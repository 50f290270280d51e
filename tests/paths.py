"""Where things are in the repository, for tests at any folder depth.

Test modules import these instead of climbing `Path(__file__).parent...`, so moving a test
into a subfolder never changes what it reads.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TINY = FIXTURES / "vllm-cpu-tiny"
TINY_MODEL = TINY / "model"
EXAMPLES = ROOT / "examples"
CRD_EXAMPLES = EXAMPLES / "crds"
DEFAULT_MODEL = ROOT / "simulator" / "default_model"

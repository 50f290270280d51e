"""Another commit of this repository, importable as `infergw` beside the installed one, so a
benchmark can run the code before a change and after it in the same run.

The commit's files are extracted (`git archive`) and a folder is built that holds an `infergw`
package laid out as that commit's pyproject maps its folders (`infergw.epp` → `epp/`, …),
of symbolic links; put first on PYTHONPATH, it wins over the editable install.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tomllib
from pathlib import Path

from infergw.bench.common import ROOT


def importable(commit: str, dest: Path, repo: Path = ROOT) -> Path:
    """The folder to put on PYTHONPATH for `commit` of `repo` (extracted under `dest`)."""
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", commit],
        capture_output=True,
        check=True,
    ).stdout
    src = dest / "src"
    src.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(src, filter="data")
    package_dir = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    path = dest / "path"
    top = path / "infergw"
    top.mkdir(parents=True, exist_ok=True)
    # The top package's own modules, then each mapped subpackage as a link to its folder.
    for item in (src / package_dir["infergw"]).iterdir():
        (top / item.name).symlink_to(item)
    for name, folder in package_dir.items():
        if name != "infergw" and name.count(".") == 1:
            link = top / name.split(".", 1)[1]
            if not link.exists():
                link.symlink_to(src / folder)
    return path

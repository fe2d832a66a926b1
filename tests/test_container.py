"""The container recipes stay in step with the Makefile. The images themselves are built and served
from by `make image-smoke` (CI, after the test suite), not here: a build takes minutes and root."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_defaults_to_the_makefiles_torch_build():
    makefile = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    dockerfile = re.search(r"^ARG TORCH_SPEC=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert makefile and dockerfile and dockerfile.group(1) == makefile.group(1)


def test_container_scripts_parse():
    scripts = sorted((ROOT / "container").glob("*.sh"))
    assert scripts
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)

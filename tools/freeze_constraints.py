"""Write constraints.txt from what the test venv resolved, so a fresh clone installs the same versions.

Run through `make constraints` after upgrading on purpose (`.venv/bin/pip install -U NAME`), then
run `make test` and commit constraints.txt together with the docs/dependencies.md table it prints.

Left out on purpose: torch and the packages only torch needs (TORCH_SPEC picks the torch build, and a
CUDA build brings its own nvidia-*/triton and may need other sympy/networkx), and darkhorse itself.
Each pin carries the Python version it was resolved on: another Python resolves freely rather than
failing on a wheel that does not exist for it.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

TORCH_ONLY = {"torch", "triton", "sympy", "mpmath", "networkx", "setuptools"}
HEADER = """\
# Pinned versions for `make demo` and `make test` (applied with pip -c by the Makefile).
# Regenerate on purpose with `make constraints` (tools/freeze_constraints.py); see docs/dependencies.md.
"""


def main() -> None:
    python = ".".join(platform.python_version_tuple()[:2])
    pins = []
    for dist in metadata.distributions():  # not `pip freeze`: it writes a locally built wheel as `name @ file://`
        name = dist.metadata["Name"]
        canonical = name.lower().replace("_", "-")
        if canonical not in TORCH_ONLY | {"darkhorse", "wheel"} and not canonical.startswith("nvidia-"):
            pins.append((name, dist.version))
    pins.sort(key=lambda pin: pin[0].lower())
    lines = [f'{name}=={version} ; python_version == "{python}"' for name, version in pins]
    Path("constraints.txt").write_text(HEADER + "\n".join(lines) + "\n")
    print(f"wrote constraints.txt: {len(pins)} pins for Python {python}")


if __name__ == "__main__":
    main()

"""Fail unless the Python environment holds exactly the versions pinned in constraints.txt.

deploy/Dockerfile runs it after deploy/install-pinned.sh, so an image whose base image brought
a different version of a pinned package (and pip kept it) fails to build instead of running
untested code. Every pinned distribution that is installed must have the pinned version (a
local build label such as torch's ``+cu128`` is allowed: it is the same release), and every
runtime requirement of the installed ``latentpipe`` must be installed.

    usage: python deploy/check_pins.py constraints.txt
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def normalise(name: str) -> str:
    """PEP 503 name: case, '-', '_' and '.' do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> dict[str, str]:
    """{normalised name: version} of every ``name==version`` line."""
    pins = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            match = PIN.match(line.strip())
            if match:
                pins[normalise(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    return {normalise(d.metadata["Name"]): d.version for d in metadata.distributions()}


def runtime_requirements(dist: str = "latentpipe") -> list[str]:
    """Names of ``dist``'s requirements that apply without extras ([] when not installed)."""
    try:
        requires = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return []
    names = []
    for req in requires:
        if "extra ==" in req.partition(";")[2]:
            continue
        names.append(normalise(re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0]))
    return names


def problems(pins: dict[str, str], have: dict[str, str], required: list[str]) -> list[str]:
    """One line per installed version that differs from its pin or missing requirement."""
    found = []
    for name, want in sorted(pins.items()):
        version = have.get(name)
        if version is not None and version.split("+", 1)[0] != want:
            found.append(f"{name}: installed {version}, pinned {want}")
    for name in required:
        if name not in have:
            found.append(f"{name}: required by latentpipe but not installed")
        elif name not in pins:
            found.append(f"{name}: required by latentpipe but not pinned in constraints.txt")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    pins = read_pins(argv[0])
    found = problems(pins, installed(), runtime_requirements())
    for line in found:
        print(f"check_pins: {line}", file=sys.stderr)
    if not found:
        print(f"check_pins: installed versions match {len(pins)} pins of {argv[0]}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

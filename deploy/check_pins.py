"""Fail unless latentpipe's dependencies are installed at exactly the versions constraints.txt pins.

deploy/Dockerfile runs it after deploy/install-pinned.sh, so an image in which pip kept a version
the base image brought (or resolved something else) fails to build instead of running untested
code. It checks the installed dependency tree of ``latentpipe[EXTRAS]`` (requirements followed
through their extras): every distribution in it that constraints.txt pins must have the pinned
version (a local build label such as torch's ``+cu128`` is the same release), and latentpipe's
own requirements must all be installed and pinned. Packages of the base image outside that tree
are not latentpipe's business and are not checked.

    usage: python deploy/check_pins.py constraints.txt EXTRAS        e.g. ... constraints.txt s3
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from importlib import metadata

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


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
    """{name: version}, the first of each name on sys.path: the one an import resolves to.
    Later ones are not installed copies but vendored metadata, e.g. setuptools/_vendor (which
    pkg_resources appends to sys.path) holds an older importlib_metadata's dist-info."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        found.setdefault(normalise(dist.metadata["Name"]), dist.version)
    return found


def installed_requires(name: str) -> list[str] | None:
    """Requirement strings of an installed distribution (None when it is not installed)."""
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return None


def parse(requirement: str) -> tuple[str, set[str], str | None]:
    """(name, requested extras, the extra this requirement belongs to) of a Requires-Dist line."""
    spec, _, marker = requirement.partition(";")
    match = REQUIREMENT.match(spec)
    extras = {normalise(e) for e in (match.group(2) or "").split(",") if e.strip()}
    extra = EXTRA_MARKER.search(marker)
    return normalise(match.group(1)), extras, normalise(extra.group(1)) if extra else None


def dependency_tree(
    root: str, extras: set[str], requires: Callable[[str], list[str] | None] = installed_requires
) -> set[str]:
    """Names reachable from ``root[extras]`` through installed requirements (root included).

    Environment markers other than ``extra`` are not evaluated: a requirement whose marker is
    false is simply not installed, and only installed distributions are compared with pins.
    """
    seen: dict[str, set[str]] = {}
    todo = [(normalise(root), {normalise(e) for e in extras})]
    while todo:
        name, wanted = todo.pop()
        if name in seen and wanted <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | wanted
        for req in requires(name) or []:
            dep, dep_extras, extra = parse(req)
            if extra is None or extra in seen[name]:
                todo.append((dep, dep_extras))
    return set(seen)


def problems(
    pins: dict[str, str], have: dict[str, str], tree: set[str], direct: list[str]
) -> list[str]:
    """One line per pinned distribution of ``tree`` installed at another version, and per
    direct requirement that is missing or unpinned."""
    found = []
    for name in sorted(tree & pins.keys()):
        version = have.get(name)
        if version is not None and version.split("+", 1)[0] != pins[name]:
            found.append(f"{name}: installed {version}, pinned {pins[name]}")
    for name in direct:
        if name not in have:
            found.append(f"{name}: required by latentpipe but not installed")
        elif name not in pins:
            found.append(f"{name}: required by latentpipe but not pinned in constraints.txt")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    pins = read_pins(argv[0])
    extras = {e for e in argv[1].split(",") if e}
    direct = [
        name
        for name, _, extra in map(parse, installed_requires("latentpipe") or [])
        if extra is None
    ]
    if not direct:
        print("check_pins: latentpipe is not installed", file=sys.stderr)
        return 1
    tree = dependency_tree("latentpipe", extras)
    found = problems(pins, installed(), tree, direct)
    for line in found:
        print(f"check_pins: {line}", file=sys.stderr)
    if not found:
        print(f"check_pins: {len(tree)} distributions of latentpipe[{argv[1]}] match {argv[0]}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

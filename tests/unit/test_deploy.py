"""deploy/Dockerfile without a container daemon: it installs with the same script and the same
pins as `make setup`, on the Ray image of the pinned Ray version, as a non-root user, with no
credentials in the image or its build context."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
SCRIPT = "deploy/install-pinned.sh"
SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH", re.I)


def _pins() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("check_pins", REPO / "deploy" / "check_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_pins = _pins()
PINS = check_pins.read_pins(str(REPO / "constraints.txt"))


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = current.partition(" ")
            lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


def _build(**build_args: str) -> tuple[str, list[str]]:
    """(base image, RUN commands) of a build with these --build-arg values."""
    args, base, runs = {}, None, []
    for word, rest in _instructions():
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = build_args.get(name, args.get(name, default))
        elif word == "FROM":
            base = _expand(rest, args)
        elif word == "RUN":
            runs.append(_expand(re.sub(r"--mount=\S+\s*", "", rest), args))
    return base, runs


def _script_calls(command: str) -> list[list[str]]:
    """The argument lists after `sh deploy/install-pinned.sh` in a shell command line."""
    calls = []
    for part in re.split(r"&&|;|\n", command):
        words = shlex.split(part)
        while words and re.fullmatch(r"\w+=\S*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if words[:2] == ["sh", SCRIPT]:
            calls.append(words[2:])
    return calls


def _make_setup_commands(tmp_path: Path) -> list[str]:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    out = subprocess.run(
        [make, "-n", "-B", "setup", f"VENV={tmp_path / 'venv'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return [ln for ln in out.stdout.splitlines() if ln.strip() and not ln.startswith("#")]


def test_base_image_is_the_official_ray_image_of_the_pin():
    ray = PINS["ray"]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"  # the pins' tested Python
    assert _build()[0] == f"rayproject/ray:{ray}-{python}-cpu"
    assert _build(VARIANT="cu128")[0] == f"rayproject/ray:{ray}-{python}-cu128"


def test_image_installs_with_the_script_make_setup_runs(tmp_path):
    make_calls = [c for line in _make_setup_commands(tmp_path) for c in _script_calls(line)]
    assert make_calls == [[str(tmp_path / "venv" / "bin" / "python"), "dev,s3"]]
    for variant in ("cpu", "cu128"):
        _, runs = _build(VARIANT=variant)
        calls = [c for run in runs for c in _script_calls(run)]
        assert calls == [["python", "s3"]], variant
        (run,) = [r for r in runs if SCRIPT in r]
        # torch from the index of the image's own CUDA (or CPU) build
        assert f"TORCH_INDEX_URL=https://download.pytorch.org/whl/{variant} " in run
        # then the pins are checked on the tree of the extras just installed
        assert "python deploy/check_pins.py constraints.txt s3" in run
    # nothing installs around the script, in either place
    everything = "\n".join(_make_setup_commands(tmp_path) + _build()[1])
    assert not re.search(r"pip\S* install|conda install|apt-get install", everything)


def test_install_script_runs_the_pinned_commands(tmp_path):
    """The script's pip calls, recorded by a stand-in interpreter."""
    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\n')
    fake.chmod(0o755)

    def calls(**env: str) -> list[str]:
        log.write_text("")
        subprocess.run(
            ["sh", SCRIPT, str(fake), "s3"],
            cwd=REPO,
            env={"PATH": "/usr/bin:/bin", **env},
            check=True,
            timeout=30,
        )
        return log.read_text().splitlines()

    assert calls() == [
        "-m pip install --quiet --upgrade pip",
        "-m pip install --quiet -c constraints.txt torch",
        "-m pip install --quiet -c constraints.txt -e .[s3]",
    ]
    url = "https://download.pytorch.org/whl/cu128"
    assert (
        calls(TORCH_INDEX_URL=url)[1]
        == f"-m pip install --quiet -c constraints.txt --index-url {url} torch"
    )
    assert "torch" in PINS  # "-c constraints.txt torch" is torch==<pin>


def test_every_requirement_of_the_installed_extras_is_pinned():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in ("dev", "s3"):  # make setup's extras; the image's (s3) are among them
        requirements += project["optional-dependencies"][extra]
    for text in requirements:
        name = check_pins.normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", text).group(0))
        assert name in PINS, (
            f"{name} ({text}) is installed by make setup / the image but not pinned"
        )


def test_installed_environment_matches_the_pins():
    """What the image checks after installing, checked here on make setup's environment."""
    assert check_pins.main([str(REPO / "constraints.txt"), "dev,s3"]) == 0


def test_pin_check_names_a_version_that_differs():
    requires = {
        "latentpipe": ["torch>=2.6", "ray[train]>=2.59", 's3fs; extra == "s3"'],
        "ray": ["pyyaml", 'tensorboardx; extra == "train"', 'fastapi; extra == "serve"'],
        "s3fs": ["aiobotocore"],
    }.get
    # the tree follows requested extras only
    assert check_pins.dependency_tree("latentpipe", set(), requires) == {
        "latentpipe",
        "torch",
        "ray",
        "pyyaml",
        "tensorboardx",
    }
    tree = check_pins.dependency_tree("latentpipe", {"s3"}, requires)
    assert {"s3fs", "aiobotocore"} <= tree and "fastapi" not in tree
    pins = {"torch": "2.13.0", "ray": "2.60.0", "pyyaml": "6.0.3", "scipy": "1.17.1"}
    have = {"torch": "2.13.0+cu128", "ray": "2.60.0", "pyyaml": "6.0.1", "scipy": "1.11.0"}
    # a local build label is the same release; scipy is the base image's, outside the tree
    assert check_pins.problems(pins, have, tree, ["torch", "ray"]) == [
        "pyyaml: installed 6.0.1, pinned 6.0.3"
    ]
    assert check_pins.problems({}, {"ray": "2.60.0"}, set(), ["ray", "onnx"]) == [
        "ray: required by latentpipe but not pinned in constraints.txt",
        "onnx: required by latentpipe but not installed",
    ]


def test_image_runs_as_the_unprivileged_ray_user():
    users = [rest for word, rest in _instructions() if word == "USER"]
    assert users and users[-1] == "ray"
    assert not any(u.split(":")[0] in ("root", "0") for u in users)
    assert all(
        "--chown=1000:100" in rest for word, rest in _instructions() if word in ("COPY", "ADD")
    )


def test_no_credentials_in_the_image_definition():
    for word, rest in _instructions():
        if word in ("ENV", "ARG", "LABEL"):
            name = re.split(r"[=\s]", rest, maxsplit=1)[0]
            assert not SECRETISH.search(name), f"{word} {rest}"
        # an AWS key id, a long hex/base64 blob, or a URL with user:password@
        assert not re.search(r"AKIA[0-9A-Z]{16}|[A-Za-z0-9+/]{40,}|://[^/\s]+:[^/\s]+@", rest), rest


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes; a pattern matching a
    directory covers everything under it; `**` matches any number of directories."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        regex = fnmatch.translate(pat).replace(".*.*/", "(.*/)?")
        if any(re.match(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_build_context_holds_what_the_image_needs_and_no_secrets():
    patterns = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    needed = ["pyproject.toml", "README.md", "constraints.txt", SCRIPT, "deploy/check_pins.py"]
    needed += [
        str(p.relative_to(REPO))
        for d in ("pipeline", "jobs", "configs")
        for p in (REPO / d).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert [p for p in needed if _dockerignored(p, patterns)] == []
    kept_out = [
        ".env",
        ".git/config",
        ".venv/bin/python",
        "deploy/kuberay/secret.yaml",
        "deploy/kuberay/overlays/production/values/train.yaml",
        "demo-out/summary.json",
        "runs/x/checkpoint_1/state.pt",
        "tests/conftest.py",
        "pipeline/__pycache__/cli.cpython-311.pyc",
        "latentpipe.egg-info/PKG-INFO",
        ".ray/auth_token",
    ]
    assert [p for p in kept_out if not _dockerignored(p, patterns)] == []


def test_pins_check_ignores_vendored_metadata_on_sys_path():
    """`import setuptools` (torch's inductor does) puts setuptools/_vendor, with older
    importlib_metadata / zipp dist-infos, on sys.path: the installed versions still count."""
    code = "import setuptools, sys; sys.path.insert(0, 'deploy'); import check_pins; "
    code += "sys.exit(check_pins.main(['constraints.txt', 'dev,s3']))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

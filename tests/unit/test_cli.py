"""The CLI fails fast on config errors, before Ray or any work starts."""

import subprocess
import sys
import time
from pathlib import Path

from pipeline.cli import main


def test_unknown_key_fails_fast_naming_it(capsys):
    assert main(["train", "data.shards=/nowhere", "train.stepz=5"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.stepz'" in err and "override 'train.stepz=5'" in err


def test_wrong_type_and_unknown_command(capsys):
    assert main(["encode", "input=a", "output=b", "encoder=c", "batch_size=many"]) == 2
    assert "key 'batch_size'" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_help_lists_commands_and_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("shards", "train", "export", "encode", "verify", "import", "report", "demo"):
        assert command in out
    assert main(["encode", "--help"]) == 0
    assert "bucket_max_aspect" in capsys.readouterr().out


def test_console_script_bad_key_exits_before_ray(tmp_path):
    """A real subprocess: exit code 2, one-line error, no Ray session directory created."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", f"workdir={tmp_path}", "trian.steps=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key 'trian'" in proc.stderr
    assert "Ray" not in proc.stderr and not any(tmp_path.iterdir())
    assert time.perf_counter() - started < 60


def test_job_entrypoints_are_the_cli(tmp_path):
    """jobs/*.py run from any working directory (as `ray job submit` does) and speak the CLI."""
    jobs = Path(__file__).resolve().parents[2] / "jobs"
    for name in ("train", "export", "encode", "verify"):
        proc = subprocess.run(
            [sys.executable, str(jobs / f"{name}.py"), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"latentpipe {name}:" in proc.stdout
    bad = subprocess.run(
        [sys.executable, str(jobs / "encode.py"), "input=a", "output=b", "encoder=c", "colour=red"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "unknown key 'colour'" in bad.stderr

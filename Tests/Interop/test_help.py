"""Snapshot tests of every subcommand's --help: a change to an option or its text shows up here.
After a deliberate change, regenerate with: QCONVERT_UPDATE_HELP=1 .venv/bin/python -m pytest Tests/Interop/test_help.py"""
import os
import pathlib
import subprocess

import pytest

from conftest import QCONVERT

SNAPSHOTS = pathlib.Path(__file__).parent / "help"
COMMANDS = [[], ["convert"], ["plan"], ["inspect"], ["dequantize"], ["diff"], ["batch"], ["batch", "run"], ["batch", "merge"], ["calibrate"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: "-".join(a) or "root")
def test_help_matches_its_snapshot(args):
    env = dict(os.environ, COLUMNS="100")
    out = subprocess.run([QCONVERT, *args, "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    snap = SNAPSHOTS / (("-".join(args) or "root") + ".txt")
    if os.environ.get("QCONVERT_UPDATE_HELP"):
        snap.write_text(out.stdout)
    assert snap.exists(), f"no snapshot {snap.name}: run with QCONVERT_UPDATE_HELP=1"
    assert out.stdout == snap.read_text(), f"--help of '{' '.join(args)}' changed; regenerate the snapshot if that was meant"

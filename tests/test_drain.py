"""The drain thread keeps the kernel buffers empty while the recorder's
Python side is busy: what the buffers cannot hold waits in user space."""

from __future__ import annotations

import subprocess

import pytest

from esr import loader
from esr.config import Config
from esr.datadir import DataDir
from esr.recorder import Recorder

pytestmark = pytest.mark.usefixtures("bpf")

OPENS = 100_000
OPENER = f"""
import os, sys
sys.stdin.readline()
for _ in range({OPENS}):
    os.close(os.open("/etc/hostname", os.O_RDONLY))
"""


def test_a_recorder_busy_for_a_whole_storm_loses_nothing(tmp_path):
    # The default 128 pages per CPU hold about 10,000 opens on two CPUs.
    config = Config(data_dir=str(tmp_path))
    recorder = Recorder(config, loader.load(config), DataDir(config.data_dir))
    try:
        opener = subprocess.Popen(["/usr/bin/python3", "-c", OPENER], stdin=subprocess.PIPE)
        session = recorder.open_session(login="t", user="t", seed_pid=opener.pid)
        opener.communicate(b"go\n", timeout=60)
        # Not one flush until the storm is over: the recorder is "busy".
        recorder.flush()
        assert session.sid not in recorder.registry.by_sid  # ended: its process exited
        assert session.lost == [0, 0, 0]
        assert session.disks >= OPENS
    finally:
        recorder.close()

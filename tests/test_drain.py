"""The drain thread keeps the kernel buffers empty while the recorder's
Python side is busy: what the buffers cannot hold waits in user space."""

from __future__ import annotations

import subprocess

import pytest

from esr import loader, schema
from esr.config import Config
from esr.datadir import DataDir
from esr.recorder import Recorder

pytestmark = pytest.mark.usefixtures("bpf")

OPENS = 100_000
# Paced, so that the test is about the recorder not reading the buffers for
# the whole storm, not about how fast its drain thread gets a CPU.
OPENER = f"""
import os, sys, time
sys.stdin.readline()
for _ in range({OPENS} // 500):
    for _ in range(500):
        os.close(os.open("/etc/hostname", os.O_RDONLY))
    time.sleep(0.005)
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
        assert not any(session.lost)
        assert schema.by_buffer(session.records)["disk"] >= OPENS
    finally:
        recorder.close()

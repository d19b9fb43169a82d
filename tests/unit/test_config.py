"""The config file: every key optional, every mistake one line naming the key."""

from __future__ import annotations

import pytest

from esr import config
from esr.errors import ConfigError


def test_an_empty_file_is_every_default():
    c = config.parse(b"", "esr.yaml")
    assert c == config.Config()
    assert c.buffer_pages() == (128, 128, 128, 512)


def test_a_session_takes_an_eighth_of_the_task_table_unless_told():
    assert config.parse(b"", "esr.yaml").tasks_per_session() == 65536 // 8
    told = config.parse(b"max_tasks_per_session: 100\n", "esr.yaml")
    assert told.tasks_per_session() == 100


def test_buffer_sizes_are_applied_as_given():
    c = config.parse(
        b"enhanced_recording:\n  command_buffer_size: 64\n  disk_buffer_size: 2\n", "esr.yaml"
    )
    assert c.buffer_pages() == (64, 2, 128, 512)


def test_the_reference_block_pastes_as_is():
    text = (
        b"enhanced_recording:\n  enabled: true\n  command_buffer_size: 8\n"
        b"  disk_buffer_size: 128\n  network_buffer_size: 8\n  cgroup_path: /cgroup2\n"
        b"  root_path: /teleport\n"
    )
    assert config.parse(text, "esr.yaml").enhanced_recording.cgroup_path == "/cgroup2"


@pytest.mark.parametrize(
    "text, message",
    [
        (b"enhanced_recording: [unclosed\n", "esr.yaml: malformed YAML"),
        (
            b"enhanced_recording:\n  disk_bufer_size: 64\n",
            "esr.yaml: enhanced_recording.disk_bufer_size: unknown key",
        ),
        (b"enhanced_recording:\n  disk_buffer_size: -8\n", "enhanced_recording.disk_buffer_size"),
        (b"enhanced_recording:\n  command_buffer_size: 12\n", "12 is not a power of two"),
        (b"enhanced_recording:\n  command_buffer_size: 4\n", "the largest record needs 8"),
        (b"enhanced_recording:\n  enabled: sometimes\n", "enhanced_recording.enabled"),
        (b"data_dir: relative/dir\n", "data_dir: must be an absolute path"),
        (b"control_socket: run/esr.sock\n", "control_socket: must be an absolute path"),
        (b"- a list\n", "expected a mapping"),
        (b"max_sessions: 0\n", "max_sessions"),
        (b"compression_level: 30\n", "compression_level"),
        (b"flush_interval_ms: fast\n", "flush_interval_ms"),
        (b"seal_interval_ms: 50\n", "seal_interval_ms"),
        (b'data_dir: "/var/lib/esr\\0/x"\n', "data_dir: contains a NUL byte"),
        (b'control_socket: "/run/\\0"\n', "control_socket: contains a NUL byte"),
        (
            b'enhanced_recording:\n  cgroup_path: "/sys/fs/cgroup\\0"\n',
            "enhanced_recording.cgroup_path: contains a NUL byte",
        ),
        (
            b"control_socket: /run/" + b"x" * 100 + b"/esr.sock\n",
            "control_socket: 114 bytes is too long for a Unix socket (at most 107)",
        ),
        (b"max_sessions: 8\nmax_sessions: 9\n", "esr.yaml: max_sessions: given twice (line 2)"),
        (
            b"enhanced_recording:\n  enabled: true\n  enabled: false\n",
            "esr.yaml: enabled: given twice (line 3)",
        ),
        (b"on_disk_full: panic\n", "on_disk_full: invalid enum value 'panic'"),
        (
            b"max_tracked_tasks: 1000\nmax_tasks_per_session: 2000\n",
            "max_tasks_per_session: 2000 is more than max_tracked_tasks (1000)",
        ),
        (b"max_tasks_per_session: 4\n", "max_tasks_per_session"),
    ],
)
def test_mistakes_are_one_line_naming_the_key(text, message):
    with pytest.raises(ConfigError) as err:
        config.parse(text, "esr.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_file_given_by_name_is_an_error_the_default_one_is_not(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(str(tmp_path / "absent.yaml"))
    assert config.load(None).data_dir  # /etc/esr/esr.yaml may be absent


def test_data_dir_given_on_the_command_line_wins(tmp_path):
    path = tmp_path / "esr.yaml"
    path.write_text("data_dir: /var/lib/elsewhere\n")
    assert config.load(str(path), "relative").data_dir.endswith("/relative")


def test_on_disk_full_takes_its_two_policies():
    assert config.parse(b"", "esr.yaml").on_disk_full == "keep_running"
    refuse = config.parse(b"on_disk_full: refuse_new_sessions\n", "esr.yaml")
    assert refuse.on_disk_full == "refuse_new_sessions"

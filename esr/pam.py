"""PAM integration.

`esr pam` is what pam_exec runs at session open and close. It runs in a
child of the process that opened the PAM session (sshd's privileged monitor,
su, login), and registers that process as the session's anchor: everything
it forks from then on (sshd's unprivileged child, the shell, and all they
start) is recorded, the anchor itself is not.

Recording must never lock anyone out: unless --fail-closed is given, any
failure is logged to syslog and the login goes ahead. The whole exchange
with the daemon is bounded by --timeout.

`esr pam enable|disable|status` installs the hook the Debian way: a
pam-auth-update profile (common-session, interactive services only), or,
without pam-auth-update, a line in /etc/pam.d/sshd. Files are backed up to
FILE.esr-backup before their first change.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import syslog

from esr import control
from esr.errors import ControlError, PamSetupError, one_line

PROFILE = "/usr/share/pam-configs/esr"
COMMON_SESSION = "/etc/pam.d/common-session"
SSHD = "/etc/pam.d/sshd"
MARK = "# esr: record this session"


def audit_id(name: str) -> int | None:
    """The audit loginuid or sessionid; None when audit never set it."""
    try:
        with open(f"/proc/self/{name}") as f:
            value = int(f.read())
    except (OSError, ValueError):
        return None
    return None if value == 0xFFFFFFFF else value


def report(message: str) -> None:
    message = one_line(message)  # it names the user and the service PAM gave
    syslog.openlog("esr-pam", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_WARNING, message)
    print(f"esr: {message}", file=sys.stderr)


def hook(socket_path: str, timeout: float, fail_closed: bool) -> int:
    """Run by pam_exec. Returns the exit status PAM sees."""
    env = os.environ
    kind = env.get("PAM_TYPE", "")
    user = env.get("PAM_USER", "")
    anchor = os.getppid()
    audit_sessionid = audit_id("sessionid")
    message: control.Open | control.Close
    if kind == "open_session":
        message = control.Open(
            login=user,
            user=env.get("PAM_RUSER") or user,
            anchor_pid=anchor,
            remote_addr=env.get("PAM_RHOST", ""),
            service=env.get("PAM_SERVICE", ""),
            tty=env.get("PAM_TTY", ""),
            audit_sessionid=audit_sessionid,
            loginuid=audit_id("loginuid"),
        )
    elif kind == "close_session":
        message = control.Close(anchor_pid=anchor, audit_sessionid=audit_sessionid)
    else:
        return 0  # only sessions are recorded
    what = f"{kind} for {user or '?'} ({env.get('PAM_SERVICE', '?')})"
    try:
        reply = control.request(socket_path, message, timeout)
    except ControlError as err:
        report(f"{what} not recorded: {err}")
        return 1 if fail_closed else 0
    if not reply.ok:
        report(f"{what} not recorded: {reply.error}")
        return 1 if fail_closed else 0
    return 0


# --- set-up -----------------------------------------------------------------------


def _hook_command(config_path: str | None) -> str:
    exe = os.path.realpath(sys.executable if getattr(sys, "frozen", False) else sys.argv[0])
    if exe == os.path.realpath("/usr/lib/esr/esr"):
        exe = "/usr/bin/esr"
    # The hook runs with / as its working directory.
    return f"{exe} pam" + (f" --config {os.path.abspath(config_path)}" if config_path else "")


def _rule(command: str) -> str:
    # optional: a failing hook must not fail the session (see --fail-closed).
    return f"optional pam_exec.so quiet {command}"


def profile(command: str) -> str:
    """The pam-auth-update profile; the package ships it for /usr/bin/esr."""
    return (
        "Name: Record login sessions with esr (Enhanced Session Recorder)\n"
        "Default: no\n"
        "Priority: 0\n"
        "Session-Interactive-Only: yes\n"
        "Session-Type: Additional\n"
        "Session:\n"
        f"\t{_rule(command)}\n"
    )


def _backup(path: str) -> None:
    backup = path + ".esr-backup"
    if os.path.exists(path) and not os.path.exists(backup):
        shutil.copy2(path, backup)


def _is_hook(line: str) -> bool:
    return "pam_exec.so" in line and " pam" in line and "esr" in line


def _hooked(path: str) -> bool:
    try:
        with open(path) as f:
            return any(_is_hook(line) and not line.lstrip().startswith("#") for line in f)
    except FileNotFoundError:
        return False


def _write(path: str, text: str) -> None:
    tmp = f"{path}.esr-new"
    with open(tmp, "w") as f:
        f.write(text)
    if os.path.exists(path):
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


def _pam_auth_update(*args: str) -> None:
    r = subprocess.run(
        ["pam-auth-update", "--package", *args], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()
        raise PamSetupError(
            f"pam-auth-update {' '.join(args)} failed: {detail[-1] if detail else r.returncode}"
        )


def enable(config_path: str | None) -> str:
    if shutil.which("pam-auth-update"):
        wanted = profile(_hook_command(config_path))
        try:
            with open(PROFILE) as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != wanted:
            os.makedirs(os.path.dirname(PROFILE), exist_ok=True)
            _write(PROFILE, wanted)
        if _hooked(COMMON_SESSION) and current == wanted:
            return f"already enabled in {COMMON_SESSION}"
        _backup(COMMON_SESSION)
        _pam_auth_update("--enable", "esr")
        if not _hooked(COMMON_SESSION):
            raise PamSetupError(
                f"pam-auth-update left {COMMON_SESSION} without the esr hook "
                "(was it edited by hand? see pam-auth-update(8) --force)"
            )
        return f"enabled in {COMMON_SESSION} (profile {PROFILE})"
    if _hooked(SSHD):
        return f"already enabled in {SSHD}"
    _backup(SSHD)
    with open(SSHD) as f:
        text = f.read()
    _write(SSHD, text.rstrip("\n") + f"\n{MARK}\nsession {_rule(_hook_command(config_path))}\n")
    return f"enabled in {SSHD}"


def disable() -> str:
    done = []
    if shutil.which("pam-auth-update") and os.path.exists(PROFILE):
        if _hooked(COMMON_SESSION):
            _backup(COMMON_SESSION)
        _pam_auth_update("--remove", "esr")
        done.append(COMMON_SESSION)
    if _hooked(SSHD):
        _backup(SSHD)
        with open(SSHD) as f:
            lines = f.read().splitlines()
        kept = [line for line in lines if line != MARK and not _is_hook(line)]
        _write(SSHD, "\n".join(kept) + "\n")
        done.append(SSHD)
    if _hooked(COMMON_SESSION):
        raise PamSetupError(f"{COMMON_SESSION} still runs the esr hook")
    return f"disabled ({', '.join(done)})" if done else "already disabled"


def status() -> tuple[bool, str]:
    where = [p for p in (COMMON_SESSION, SSHD) if _hooked(p)]
    if where:
        return True, f"enabled in {', '.join(where)}"
    return False, "disabled"

"""The esr command line. Every failure is one line on stderr and a non-zero
exit status; modules are imported by the command that needs them, so that
quick commands start quickly."""

from __future__ import annotations

import argparse
import json
import os
import sys

from esr import __version__, bench
from esr.errors import EsrError, LoadError, UsageError, one_line


def _version() -> str:
    try:
        from esr._commit import COMMIT
    except ImportError:
        COMMIT = "unknown"
    return f"esr {__version__} (commit {COMMIT})"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"esr: {message} (see `{self.prog} --help`)\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 60:  # also refuses nan; a login waits this long at most
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 60")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _epoch(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 1 to 86400")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="config file (default /etc/esr/esr.yaml)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="where recordings and the audit log are kept "
        "(default: data_dir from the config, or $ESR_DATA_DIR)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="esr",
        description="Enhanced Session Recorder: records every program "
        "executed, file opened and network connection made in a login session.",
    )
    parser.add_argument("--version", action="version", version=_version())
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", help="record a command and everything it starts as a session")
    _common(p)
    p.add_argument("--sid", help="session id (default: a new UUID)")
    p.add_argument("--login", help="login name to record (default: the current user)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    p = sub.add_parser("sessions", help="list recorded sessions")
    _common(p)
    p.add_argument("--format", choices=("text", "json"), default="text")

    p = sub.add_parser("show", help="print a session's events in order, or its process tree")
    _common(p)
    p.add_argument("sid", metavar="SID", help="session id, or a unique prefix of one")
    p.add_argument("--format", choices=("json", "text", "tree"), default="json")
    p.add_argument("--type", metavar="TYPE", help="command, disk, network or terminal")
    p.add_argument(
        "--raw",
        action="store_true",
        help="let recorded terminal bytes through to this terminal as they were",
    )

    p = sub.add_parser("play", help="replay a session's terminal with its timing")
    _common(p)
    p.add_argument("sid", metavar="SID")
    p.add_argument(
        "--speed", type=_positive, default=1.0, metavar="X", help="play X times as fast (default 1)"
    )
    p.add_argument(
        "--idle-limit", type=_positive, metavar="S", help="wait at most S seconds between outputs"
    )

    p = sub.add_parser("export", help="write a session's terminal in another format")
    _common(p)
    p.add_argument("sid", metavar="SID")
    p.add_argument("--format", choices=("asciicast",), required=True)
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: stdout)")

    p = sub.add_parser(
        "verify",
        help="check a recording's frames, hash chain and seals",
        description="Check a recording's frames and hash chain against its seals "
        "(sessions/SID.seal) and the end seal in the audit log. On another machine, "
        "point --data-dir at a copy holding sessions/SID.esr, sessions/SID.seal and log/.",
    )
    _common(p)
    p.add_argument("sid", metavar="SID")
    p.add_argument(
        "--key",
        metavar="FILE",
        help="the verification key `esr keygen` printed: authenticates every seal",
    )

    p = sub.add_parser(
        "keygen",
        help="make this host's sealing key; print the key that verifies its seals",
        description="Write a new sealing key into the data dir (seal.key, 0600), "
        "where the recorder reads it and moves it forward every epoch, and print "
        "the verification key on standard output: keep it off this host.",
    )
    _common(p)
    p.add_argument(
        "--epoch",
        type=_epoch,
        default=900,
        metavar="SECONDS",
        help="how long each key is used before it is replaced by the next (default 900)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing key")

    p = sub.add_parser("ui", help="review sessions in a web browser")
    _common(p)
    p.add_argument(
        "--listen",
        default="127.0.0.1:8470",
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:8470; port 0 picks a free one)",
    )
    _index_option(p)
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="write the address with its access token to FILE (mode 0600) instead of stderr",
    )

    p = sub.add_parser("index", help="bring the search index of `esr ui` up to date")
    _common(p)
    _index_option(p)
    p.add_argument(
        "--rebuild", action="store_true", help="forget the index and read every recording again"
    )

    p = sub.add_parser("check", help="report what this kernel offers esr")
    _common(p)

    p = sub.add_parser("daemon", help="record every session PAM or `esr run` opens (foreground)")
    _common(p)

    p = sub.add_parser("status", help="print the running daemon's counters")
    _common(p)
    p.add_argument("--format", choices=("text", "json"), default="text")

    p = sub.add_parser(
        "pam",
        help="the PAM session hook (run by pam_exec), or set it up",
        description="Without an action: the hook pam_exec runs at session "
        "open and close. With one: add the hook to the PAM configuration, "
        "remove it, or tell whether it is there.",
    )
    _common(p)
    p.add_argument("action", nargs="?", choices=("enable", "disable", "status"))
    p.add_argument(
        "--fail-closed",
        action="store_true",
        help="deny the session when it cannot be recorded (default: allow it)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=0.8,
        metavar="SECONDS",
        help="give up on the daemon after this long (default 0.8)",
    )
    p = sub.add_parser(
        "bench",
        help="measure event throughput and overhead, side by side with "
        "the C floor and the bcc peer",
    )
    _common(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a few thousand events per run: check the accounting and the figures",
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="only the user-space hot path on a synthetic corpus (no root needed)",
    )
    p.add_argument(
        "--ui",
        action="store_true",
        help="the sessions list and search of `esr ui`, on 10,000 generated sessions "
        "(no root needed)",
    )
    p.add_argument(
        "--corpus", metavar="DIR", help="with --ui: generate the sessions into DIR, or reuse them"
    )
    p.add_argument("--seconds", type=float, default=3.0, help="length of each run (default 3)")
    p.add_argument("--workloads", type=_list(str), default=list(bench.WORKLOADS))
    p.add_argument(
        "--rates",
        type=_list(int),
        default=list(bench.RATES),
        help=f"events/s, 0 for flat out (default {','.join(map(str, bench.RATES))})",
    )
    p.add_argument("--modes", type=_list(str), default=list(bench.MODES))
    p.add_argument(
        "--repeat",
        type=_count,
        default=1,
        metavar="N",
        help="run every consumer N times, in turn, and report medians and spreads (default 1)",
    )
    p.add_argument(
        "--baseline",
        metavar="CHECKOUT",
        help="also run the recorder of another esr checkout (built with `make build`), "
        "as the consumer `baseline`, to compare with this one",
    )
    return parser


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of runs from 1 to 100")
    return value


def _index_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index",
        metavar="FILE",
        help="the search index (default: one per data dir in /var/cache/esr for root, "
        "in ~/.cache/esr for others)",
    )


def _list(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of {kind.__name__}: {text!r}") from None

    return parse


def _data_dir(args) -> str | None:
    """--data-dir or $ESR_DATA_DIR: both beat data_dir in the config file."""
    return getattr(args, "data_dir", None) or os.environ.get("ESR_DATA_DIR") or None


def _config(args):
    from esr import config

    return config.load(getattr(args, "config", None), _data_dir(args))


def _cmd_run(args) -> int:
    from esr.run import run

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UsageError("run: no command given (esr run -- CMD [ARGS...])")
    return run(_config(args), argv, args.sid, args.login)


def _cmd_sessions(args) -> int:
    from esr.datadir import DataDir
    from esr.show import sessions, sessions_text

    rows = sessions(DataDir(_config(args).data_dir))
    if args.format == "json":
        for row in rows:
            print(json.dumps(row, ensure_ascii=True))
    else:
        print(sessions_text(rows))
    return 0


def _cmd_show(args) -> int:
    from esr.datadir import DataDir
    from esr.show import show

    show(DataDir(_config(args).data_dir), args.sid, args.format, args.type, args.raw)
    return 0


def _cmd_play(args) -> int:
    from esr.datadir import DataDir
    from esr.terminal import play

    play(DataDir(_config(args).data_dir), args.sid, args.speed, args.idle_limit)
    return 0


def _cmd_export(args) -> int:
    from esr.datadir import DataDir
    from esr.terminal import asciicast

    lines = asciicast(DataDir(_config(args).data_dir), args.sid)
    if args.output is None:
        sys.stdout.writelines(lines)
        return 0
    # Written whole, then renamed: a damaged recording leaves no half file.
    tmp = f"{args.output}.esr-tmp"
    with open(tmp, "w") as f:
        try:
            f.writelines(lines)
        except BaseException:
            os.unlink(tmp)
            raise
    os.replace(tmp, args.output)
    return 0


def _cmd_verify(args) -> int:
    from esr.datadir import DataDir
    from esr.seal import VerificationKey
    from esr.show import verify

    key = VerificationKey.load(args.key) if args.key else None
    print(verify(DataDir(_config(args).data_dir), args.sid, key))
    return 0


def _cmd_keygen(args) -> int:
    import fcntl

    from esr.datadir import DataDir
    from esr.errors import SealError
    from esr.seal import HostKey

    datadir = DataDir(_config(args).data_dir)
    datadir.ensure()
    # The daemon rewrites the key as epochs pass: it would put its own back.
    lock = os.open(os.path.join(datadir.path, "esr.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SealError(
                f"an esr daemon is recording into {datadir.path}: stop it first"
            ) from None
        verification = HostKey.create(datadir.seal_key(), args.epoch, args.force)
    finally:
        os.close(lock)
    sys.stdout.write(verification.line())
    print(
        f"esr: sealing key {verification.id.hex()} written to {datadir.seal_key()}; keep the "
        "verification key above off this host (esr verify --key FILE)",
        file=sys.stderr,
    )
    return 0


def _cmd_ui(args) -> int:
    from esr import index
    from esr.datadir import DataDir
    from esr.ui.server import serve

    datadir = DataDir(_config(args).data_dir)
    return serve(
        datadir, args.index or index.default_path(datadir.path), args.listen, args.token_file
    )


def _cmd_index(args) -> int:
    from esr import index
    from esr.datadir import DataDir

    datadir = DataDir(_config(args).data_dir)
    print(index.update(datadir, args.index or index.default_path(datadir.path), args.rebuild))
    return 0


def _cmd_check(args) -> int:
    from esr.check import check

    lacking = []
    for line, lacks in check(_config(args)):
        print(line)
        if lacks:
            lacking.append(lacks)
    if lacking:
        # The first is the cause: a kernel too old lacks much else too.
        raise LoadError(f"cannot record on this kernel: {lacking[0]}")
    return 0


def _cmd_daemon(args) -> int:
    from esr.daemon import main

    return main(getattr(args, "config", None), _data_dir(args))


def _cmd_status(args) -> int:
    from esr import control
    from esr.errors import ControlError

    config = _config(args)
    reply = control.request(config.control_socket, control.Status(), timeout=5)
    if not reply.ok:
        raise ControlError(reply.error)
    status = reply.status or {}
    if args.format == "json":
        print(json.dumps(status, indent=2))
        return 0
    lost = status["lost"]
    print(f"uptime: {status['uptime_s']} s")
    print(
        f"enhanced recording: {status['enhanced_recording']}, buffers (pages per CPU): "
        + ", ".join(f"{k} {v}" for k, v in status["buffer_pages"].items())
    )
    hooks = ""
    if status["enhanced_recording"]:
        attached = status["session_hooks_attached"]
        hooks = " (session hooks " + ("attached)" if attached else "detached: none recorded)")
    print(f"sessions open: {status['sessions_open']}{hooks}")
    print("events: " + ", ".join(f"{k} {v}" for k, v in status["events"].items()))
    print(
        "lost per buffer: "
        + ", ".join(f"{k} {v}" for k, v in lost["buffer"].items())
        + f"; not written: {lost['user_space']}"
    )
    for sid, counts in lost["sessions"].items():
        print(f"lost in session {sid}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if status["disk_full"]:
        print("DISK FULL OR FAILING: what is recorded cannot all be written")
    for sid, unwritten in lost["not_written"].items():
        now = f" (failing now: {unwritten['failing']})" if unwritten["failing"] else ""
        print(
            f"not written in session {sid}: "
            + ", ".join(f"{k} {v}" for k, v in unwritten["records"].items())
            + now
        )
    if lost["audit_lines"]:
        print(f"audit log lines not written: {lost['audit_lines']}")
    sealing = status["seal"]
    print(
        f"sealing: key {sealing['key']}, epoch {sealing['epoch']}"
        if sealing["key"]
        else "sealing: without a key (esr keygen makes one)"
    )
    if sealing["errors"]:
        print(f"seals not written: {sealing['errors']}")
    print(f"bytes written: {status['bytes_written']}")
    return 0


def _cmd_pam(args) -> int:
    from esr import pam

    config_path = getattr(args, "config", None)
    if args.action is None:
        try:
            socket_path = _config(args).control_socket
        except EsrError as err:
            # Still let the login through (or not, if fail-closed); pam_exec
            # drops stderr, so syslog gets it too.
            pam.report(str(err))
            return 1 if args.fail_closed else 0
        return pam.hook(socket_path, args.timeout, args.fail_closed)
    if args.action == "status":
        enabled, text = pam.status()
        print(text)
        return 0 if enabled else 3
    print(pam.enable(config_path) if args.action == "enable" else pam.disable())
    return 0


def _cmd_bench(args) -> int:
    from esr.bench import harness

    if args.ui:
        from esr.bench import ui

        sizes = (200, 100_000) if args.smoke else (10_000, 10_000_000)
        print(json.dumps(ui.measure(*sizes, keep=args.corpus), indent=1))
        return 0
    config = _config(args)
    if args.offline:
        from esr.bench.offline import measure

        print(json.dumps(measure(level=config.compression_level), indent=1))
        return 0
    modes = args.modes
    if args.baseline:
        args.baseline = os.path.abspath(args.baseline)
        if "baseline" not in modes:
            # Right after esr's own, so that each is measured next to the other.
            at = modes.index("esr") + 1 if "esr" in modes else len(modes)
            modes = [*modes[:at], "baseline", *modes[at:]]
    elif "baseline" in modes:
        raise UsageError("bench: the baseline mode needs --baseline CHECKOUT")
    for name, chosen, known in (
        ("workload", args.workloads, bench.WORKLOADS),
        ("mode", modes, (*bench.MODES, "baseline")),
    ):
        unknown = set(chosen) - set(known)
        if unknown:
            raise UsageError(
                f"bench: unknown {name} {', '.join(sorted(unknown))} "
                f"(choose from {', '.join(known)})"
            )
    if args.smoke:
        return harness.main(bench.WORKLOADS, [5000, 0], bench.MODES, 0.3, args.json, True, config)
    return harness.main(
        args.workloads,
        args.rates,
        modes,
        args.seconds,
        args.json,
        False,
        config,
        args.repeat,
        args.baseline,
    )


COMMANDS = {
    "bench": _cmd_bench,
    "daemon": _cmd_daemon,
    "status": _cmd_status,
    "pam": _cmd_pam,
    "run": _cmd_run,
    "sessions": _cmd_sessions,
    "show": _cmd_show,
    "play": _cmd_play,
    "export": _cmd_export,
    "verify": _cmd_verify,
    "keygen": _cmd_keygen,
    "ui": _cmd_ui,
    "index": _cmd_index,
    "check": _cmd_check,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`esr show | head`): not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"esr: {one_line(f'{where}{err.strerror or err}')}", file=sys.stderr)
        return 1
    except EsrError as err:
        print(f"esr: {one_line(str(err))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

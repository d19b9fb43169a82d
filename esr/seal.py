"""Seals: what vouches for a recording from outside it (docs/sealing.md).

Once the frames of a flush are on disk, the recorder appends one seal per
session that wrote to sessions/<sid>.seal: the recording's chain head (frame
count, last event index, size, digest of the last frame), authenticated
with HMAC-SHA256 under the current epoch's key and chained to the previous
seal. An open session is sealed at least once per epoch even when idle, and
its end is sealed too; that last seal is also written into the session.end
line of the audit log.

Keys evolve forward: key[i+1] = SHA-256("esr evolve" || key[i]), one per
epoch of `period` seconds from `start`. The host keeps only the current one
(data_dir/seal.key, rewritten in place at each epoch), so whoever takes the
host later cannot forge the seals of earlier epochs; the verifier keeps
key[0] off the host and derives any epoch's key from it. Without a key the
seals use an empty one: anyone can recompute them, so they catch a
recording cut or emptied behind the seal file's back, not a rewrite of both.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import hmac
import json
import os
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Any

from esr.errors import EsrError, SealError
from esr.recording import EMPTY, Summary, Writer, open_regular
from esr.room import Room

MAGIC = b"ESRS"
VERSION = 1
# magic, version, kind, flags, key id, epoch, time (ns), frames, last ei,
# size, chain head, MAC.
SEAL = struct.Struct("<4sBBH8sQQQqQ16s32s")
MAC_SIZE = 32

KIND_FLUSH = 1  # frames were written
KIND_EPOCH = 2  # nothing was, but an epoch began: the session was still open
KIND_END = 3  # the end frame
KINDS = {KIND_FLUSH: "flush", KIND_EPOCH: "epoch", KIND_END: "end"}
FLAG_RECOVERED = 0x1  # the end was written by the next recorder, after a crash

NO_KEY = bytes(8)  # the key id of seals made without a key
# Bytes kept allocated past the end of a seal file: its end seal always fits.
RESERVE = 4096


@dataclass(frozen=True)
class Seal:
    kind: int
    flags: int
    key_id: bytes
    epoch: int
    time: int
    frames: int
    last_ei: int
    size: int
    head: bytes
    mac: bytes
    raw: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Seal:
        magic, version, kind, flags, key_id, epoch, t, frames, last_ei, size, head, mac = (
            SEAL.unpack(raw)
        )
        if magic != MAGIC or version != VERSION or kind not in KINDS:
            raise ValueError("not an esr seal")
        return cls(kind, flags, key_id, epoch, t, frames, last_ei, size, head, mac, raw)

    def upto(self) -> str:
        return f"frame {self.frames - 1} (events 0..{self.last_ei})"


def chain_seed(sid: str) -> bytes:
    return hashlib.sha256(b"esr seal chain\0" + sid.encode()).digest()


def _mac(key: bytes, sid: str, prev: bytes, body: bytes) -> bytes:
    return hmac.digest(key, b"esr seal\0" + sid.encode() + b"\0" + prev + body, "sha256")


# --- keys ----------------------------------------------------------------------------


def _evolve(key: bytes) -> bytes:
    return hashlib.sha256(b"esr evolve\0" + key).digest()


def _key_id(key0: bytes) -> bytes:
    return hashlib.sha256(b"esr key id\0" + key0).digest()[:8]


def _parse_key(text: bytes, kind: str, source: str) -> dict[str, Any]:
    """The fields of a one-line key file: `KIND 1 name=value ...`."""
    words = text.decode("ascii", "replace").split()
    if words[:2] != [kind, "1"]:
        raise SealError(f"{source}: not an {kind} file")
    fields = dict(w.partition("=")[::2] for w in words[2:])
    try:
        out: dict[str, Any] = {
            "id": bytes.fromhex(fields["id"]),
            "start": int(fields["start"]),
            "period": int(fields["period"]),
            "key": bytes.fromhex(fields["key"]),
        }
        if "epoch" in fields:
            out["epoch"] = int(fields["epoch"])
    except (KeyError, ValueError):
        raise SealError(f"{source}: damaged {kind} file") from None
    if len(out["id"]) != 8 or len(out["key"]) != 32 or out["period"] < 1:
        raise SealError(f"{source}: damaged {kind} file")
    return out


def _epoch_at(start: int, period: int, now_ns: int) -> int:
    return max(0, (now_ns // 1_000_000_000 - start) // period)


class VerificationKey:
    """key[0]: derives the key of any epoch. Kept off the host."""

    def __init__(self, key0: bytes, start: int, period: int):
        self.key0 = key0
        self.id = _key_id(key0)
        self.start = start
        self.period = period
        self._derived = (0, key0)

    @classmethod
    def load(cls, path: str) -> VerificationKey:
        try:
            with open_regular(path) as f:
                fields = _parse_key(f.read(4096), "esr-verification-key", path)
        except OSError as err:
            raise SealError(f"{path}: {err.strerror}") from None
        key = cls(fields["key"], fields["start"], fields["period"])
        if key.id != fields["id"]:
            raise SealError(f"{path}: damaged esr-verification-key file")
        return key

    def line(self) -> str:
        return (
            f"esr-verification-key 1 id={self.id.hex()} start={self.start} "
            f"period={self.period} key={self.key0.hex()}\n"
        )

    def epoch_at(self, now_ns: int) -> int:
        return _epoch_at(self.start, self.period, now_ns)

    def key(self, epoch: int) -> bytes:
        """Seals come in epoch order: derive from the last key derived."""
        at, key = self._derived if epoch >= self._derived[0] else (0, self.key0)
        for _ in range(epoch - at):
            key = _evolve(key)
        self._derived = (epoch, key)
        return key


class HostKey:
    """The current epoch's key, in data_dir/seal.key; earlier ones are gone.

    The file is one line of fixed length, rewritten in place when the epoch
    changes, so the previous key's bytes are overwritten rather than left in
    a freed block. Every recorder of the data dir (the daemon, esr run
    without it) moves it forward under a lock, never back.
    """

    def __init__(self, path: str, fd: int, fields: dict):
        self.path = path
        self.fd = fd
        self.id: bytes = fields["id"]
        self.start: int = fields["start"]
        self.period: int = fields["period"]
        self.epoch: int = fields["epoch"]
        self.key: bytes = fields["key"]

    @staticmethod
    def _line(id_: bytes, start: int, period: int, epoch: int, key: bytes) -> bytes:
        return (
            f"esr-sealing-key 1 id={id_.hex()} start={start:020d} period={period:020d} "
            f"epoch={epoch:020d} key={key.hex()}\n"
        ).encode()

    @classmethod
    def load(cls, path: str) -> HostKey | None:
        """The host's key; None when there is none (unkeyed seals)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise SealError(f"{path}: {err.strerror}") from None
        try:
            fields = _parse_key(os.pread(fd, 4096, 0), "esr-sealing-key", path)
            if fields.get("epoch", -1) < 0:
                raise SealError(f"{path}: damaged esr-sealing-key file")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, fields)

    @classmethod
    def create(cls, path: str, period: int, force: bool) -> VerificationKey:
        """A new key for this host; returns what verifies its seals."""
        verification = VerificationKey(secrets.token_bytes(32), int(time.time()), period)
        line = cls._line(verification.id, verification.start, period, 0, verification.key0)
        tmp = f"{path}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            if force:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)
        except FileExistsError:
            raise SealError(
                f"{path} exists: its seals verify with the key made with it (--force replaces it)"
            ) from None
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        return verification

    def next_epoch_s(self, now_ns: int) -> int:
        """When the epoch after now's begins, in seconds since the Unix epoch."""
        return self.start + (_epoch_at(self.start, self.period, now_ns) + 1) * self.period

    def current(self, now_ns: int) -> tuple[int, bytes]:
        """The epoch to seal in now, and its key, moving the key forward when
        an epoch has begun since."""
        target = _epoch_at(self.start, self.period, now_ns)
        if target > self.epoch:
            self._advance(target)
        return self.epoch, self.key

    def _advance(self, target: int) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            try:
                disk = _parse_key(os.pread(self.fd, 4096, 0), "esr-sealing-key", self.path)
                if disk["id"] == self.id and disk.get("epoch", -1) > self.epoch:
                    self.epoch, self.key = disk["epoch"], disk["key"]
            except SealError:
                pass  # ours is the key; the file is rewritten below
            key = self.key
            for _ in range(target - self.epoch):
                key = _evolve(key)
            if target > self.epoch:
                os.pwrite(self.fd, self._line(self.id, self.start, self.period, target, key), 0)
                os.fdatasync(self.fd)
                self.epoch, self.key = target, key
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- the seal file -------------------------------------------------------------------


def read(path: str) -> list[Seal]:
    """Every complete seal of a seal file; [] when there is none. A torn
    last seal (a crash mid-write) is left out."""
    try:
        with open_regular(path) as f:
            data = f.read()
    except FileNotFoundError:
        return []
    seals = []
    for i in range(len(data) // SEAL.size):
        try:
            seals.append(Seal.parse(data[i * SEAL.size : (i + 1) * SEAL.size]))
        except ValueError:
            raise SealError(f"seal {i} of {path}: not an esr seal") from None
    return seals


def last(path: str) -> Seal | None:
    """The last complete seal, reading only it."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            n = size // SEAL.size
            if not n:
                return None
            f.seek((n - 1) * SEAL.size)
            return Seal.parse(f.read(SEAL.size))
    except FileNotFoundError:
        return None
    except ValueError:
        raise SealError(f"{path}: its last seal is not an esr seal") from None


def unlike(summary: Summary, last_seal: Seal | None) -> str | None:
    """What a headers-only scan of a recording and its last seal disagree
    on, cheaply: a cut, a rewritten end, an end never sealed."""
    if last_seal is None:
        return "its seal file is missing or empty" if summary.sealed else None
    if last_seal.frames > summary.frames:
        ends = (
            f"the file ends after frame {summary.frames - 1} (events 0..{summary.last_ei})"
            if summary.frames
            else "the file holds no frame"
        )
        what = "its end at " if last_seal.kind == KIND_END else ""
        return f"sealed through {what}{last_seal.upto()} but {ends}"
    if last_seal.frames == summary.frames and last_seal.head != summary.digest:
        return f"frame {summary.frames - 1} is not the one sealed"
    if summary.closed and last_seal.kind != KIND_END:
        return f"its end (frame {summary.frames - 1}) is not sealed"
    return None


class Sealer:
    """Appends the seals of one session."""

    def __init__(self, sid: str, fd: int, size: int, prev: bytes, frames: int, epoch: int):
        self.sid = sid
        self.fd = fd
        self.room = Room(fd, size, RESERVE)
        self.prev = prev  # the last seal's MAC: the next one chains to it
        self.frames = frames  # frames of the recording the last seal covers
        self.epoch = epoch  # of the last seal; -1 before the first

    @classmethod
    def create(cls, path: str, sid: str) -> Sealer:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
        return cls(sid, fd, 0, chain_seed(sid), 0, -1)

    @classmethod
    def resume(cls, path: str, sid: str) -> tuple[Sealer, list[Seal]]:
        """Reopen a seal file to seal a recording's end after a crash; a
        torn last seal is cut off."""
        seals = read(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        size = len(seals) * SEAL.size
        os.ftruncate(fd, size)
        if seals:
            return cls(sid, fd, size, seals[-1].mac, seals[-1].frames, seals[-1].epoch), seals
        return cls(sid, fd, 0, chain_seed(sid), 0, -1), seals

    def seal(
        self,
        kind: int,
        writer: Writer,
        key: HostKey | None,
        flags: int = 0,
        reserved: bool = False,
    ) -> Seal | None:
        """Seal the recording as writer left it. None when there is no room
        (only an end may use the reserve); raises OSError on a failing disk."""
        now = time.time_ns()
        epoch, secret, key_id = (*key.current(now), key.id) if key else (0, b"", NO_KEY)
        body = SEAL.pack(
            MAGIC,
            VERSION,
            kind,
            flags,
            key_id,
            epoch,
            now,
            writer.frames,
            writer.last_ei,
            writer.size,
            writer.digest,
            b"",
        )[:-MAC_SIZE]
        raw = body + _mac(secret, self.sid, self.prev, body)
        if not reserved and not self.room.take(len(raw)):
            return None
        try:
            if os.write(self.fd, raw) != len(raw):
                raise OSError(errno.ENOSPC, "short write")
        except OSError:
            os.ftruncate(self.fd, self.room.size)
            self.room.cut(self.room.size)
            raise
        sealed = Seal.parse(raw)
        self.room.wrote(len(raw))
        self.prev, self.frames, self.epoch = sealed.mac, sealed.frames, epoch
        return sealed

    def audit_field(self, sealed: Seal, prev: bytes) -> dict:
        """The seal as the session.end line of the audit log carries it."""
        return {
            "frames": sealed.frames,
            "last_ei": sealed.last_ei,
            "epoch": sealed.epoch,
            "key_id": sealed.key_id.hex(),
            "record": sealed.raw.hex(),
            "prev": prev.hex(),
        }

    def close(self, sync: bool = False) -> None:
        if self.fd >= 0:
            try:
                self.room.release()
                if sync:
                    os.fdatasync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1


def audit_seal(log_dir: str, sid: str, since: str = "") -> tuple[Seal, bytes] | None:
    """The end seal the audit log holds for sid, and the MAC it chains to:
    from the session.end line in the day files from `since` (YYYY-MM-DD) on."""
    needle = f'"sid":"{sid}"'.encode()
    for path in sorted(glob.glob(os.path.join(glob.escape(log_dir), "*", "*.log"))):
        if os.path.basename(path)[:10] < since:
            continue
        try:
            with open_regular(path) as f:
                for line in f:
                    if b'"event":"session.end"' not in line or needle not in line:
                        continue
                    field = json.loads(line).get("seal")
                    if isinstance(field, dict):
                        return (
                            Seal.parse(bytes.fromhex(field["record"])),
                            bytes.fromhex(field["prev"]),
                        )
        except (OSError, EsrError, ValueError, KeyError, TypeError, struct.error):
            continue
    return None


# --- checking a recording against its seals --------------------------------------------


@dataclass(frozen=True)
class Head:
    """The recording's chain after one of its frames."""

    last_ei: int
    size: int  # bytes up to the end of the frame
    digest: bytes
    closed: bool


def _file_ends(chain: list[Head], cut: str) -> str:
    if not chain:
        return EMPTY if cut in ("", EMPTY) else f"not even frame 0 is whole ({cut})"
    where = f"the file ends after frame {len(chain) - 1} (events 0..{chain[-1].last_ei})"
    return f"{where}, then {cut}" if cut else where


def check(
    sid: str,
    chain: list[Head],
    cut: str,
    seals: list[Seal],
    marked: bool,
    key: VerificationKey | None,
    audit: tuple[Seal, bytes] | None,
    now_ns: int,
    times: tuple[int | None, int | None] = (None, None),
) -> str:
    """Check a recording's chain against its seals and the audit log's end
    seal. chain: the heads of its intact frames; cut: why it stops there,
    if it does early; marked: its frames say they are sealed; times: when
    its session.start and session.end say they happened. Returns what the
    seals vouch for; raises SealError saying what is missing or forged."""
    ends = _file_ends(chain, cut)
    if not seals and not audit:
        if marked:
            raise SealError("the seal file is missing or empty, though the frames say it exists")
        if key is not None:
            raise SealError("not sealed (recorded without seals): the key cannot vouch for it")
        return "not sealed (recorded without seals)"
    prev = chain_seed(sid)
    good = 0  # frames the seals so far vouch for
    epoch = -1
    beyond = False  # a seal vouches for frames the file does not hold
    for i, s in enumerate(seals):
        secret: bytes | None = None
        if s.key_id == NO_KEY:
            if key is not None:
                raise SealError(
                    f"seal {i} was made without a key: the recording was not sealed with "
                    "this one, so it cannot vouch for it"
                )
            secret = b""
        elif key is not None:
            if s.key_id != key.id:
                raise SealError(f"seal {i} was made with key {s.key_id.hex()}, not {key.id.hex()}")
            if s.epoch > key.epoch_at(now_ns) + 1:
                raise SealError(f"seal {i} claims epoch {s.epoch}, which has not begun")
            secret = key.key(s.epoch)
        if secret is not None and _mac(secret, sid, prev, s.raw[:-MAC_SIZE]) != s.mac:
            raise SealError(
                f"seal {i} (epoch {s.epoch}) does not authenticate: it was forged or "
                "altered, or a seal before it was removed"
            )
        if s.epoch < epoch or s.frames < good:
            raise SealError(f"seal {i} goes back: the seal file was reordered")
        if key is not None and epoch >= 0 and s.epoch > epoch + 1:
            raise SealError(
                f"no seal in epochs {epoch + 1}..{s.epoch - 1} though the session was open: "
                "the recorder was stopped or stalled, or the seal file was cut and sealed again"
            )
        if s.frames < 1:
            raise SealError(f"seal {i} covers no frame: it is not the recorder's")
        if s.kind == KIND_END and i != len(seals) - 1:
            raise SealError(f"seals follow the sealed end (seal {i})")
        beyond = beyond or s.frames > len(chain)
        if not beyond:
            head = chain[s.frames - 1]
            if (head.digest, head.size, head.last_ei) != (s.head, s.size, s.last_ei):
                raise SealError(
                    f"frames {good}..{s.frames - 1} were rewritten after they were sealed "
                    f"(seal {i}, epoch {s.epoch})"
                )
        prev, good, epoch = s.mac, s.frames, s.epoch
    if key is not None and seals:
        # A seal follows what it vouches for within a flush interval: one
        # made with a key stolen later cannot pass for one made at the time.
        checks = [("start", seals[0], times[0])]
        if seals[-1].kind == KIND_END:
            checks.append(("end", seals[-1], times[1]))
        for what, s, at in checks:
            if at is not None and s.epoch > key.epoch_at(at) + 1:
                raise SealError(
                    f"the session's {what} (epoch {key.epoch_at(at)}) was sealed in "
                    f"epoch {s.epoch}: the seals were made again, later"
                )
    if beyond:
        final = seals[-1]
        what = "its end at " if final.kind == KIND_END else ""
        raise SealError(f"sealed through {what}{final.upto()} but {ends}")
    if audit is not None:
        end, end_prev = audit
        if key is not None and (
            end.key_id != key.id
            or end.epoch > key.epoch_at(now_ns) + 1
            or _mac(key.key(end.epoch), sid, end_prev, end.raw[:-MAC_SIZE]) != end.mac
        ):
            raise SealError("the end seal in the audit log does not authenticate with this key")
        if end.frames > len(chain):
            raise SealError(f"the audit log seals the end at {end.upto()} but {ends}")
        if not seals or seals[-1].mac != end.mac:
            stop = f"stops at {seals[-1].upto()}" if seals else "is missing or empty"
            raise SealError(f"the audit log seals the end at {end.upto()} but the seal file {stop}")
    final = seals[-1]
    if final.kind == KIND_END and len(chain) > final.frames:
        raise SealError(f"frames {final.frames}..{len(chain) - 1} follow the sealed end")
    if final.kind != KIND_END and chain and chain[-1].closed:
        raise SealError(
            f"the end (frame {len(chain) - 1}) is not sealed: the seals stop at {final.upto()}"
        )
    if key is not None:
        what = f"sealed with key {key.id.hex()}, epochs {seals[0].epoch}..{final.epoch}"
    elif final.key_id == NO_KEY:
        what = "sealed without a key (a cut shows, a rewrite of both files would not)"
    else:
        what = f"sealed with key {final.key_id.hex()} (not checked: give --key)"
    if audit is not None:
        what += "; the audit log holds the same end seal"
    unsealed = len(chain) - final.frames
    if unsealed:
        what += f"; frames {final.frames}..{len(chain) - 1} are not sealed yet"
    if final.flags & FLAG_RECOVERED:
        what += "; its end was written after the recorder stopped"
    return what

"""Boot a real systemd Debian guest (bullseye, bookworm or trixie) under qemu,
for end-to-end tests.

    from guest import Guest, ensure_image
    with Guest(release="trixie") as g:      # builds the image on first use
        ...
    # Debian 12's userland on Debian 11's kernel (5.10), which esr's binary,
    # built on Debian 12, can run on:
    with Guest(release="bookworm", kernel="bullseye") as g: ...
        g.copy_to("esr.deb", "/tmp/esr.deb")
        g.ssh("apt-get install -y /tmp/esr.deb")
        g.reboot()

Stdlib only. The image (rootfs made with debootstrap, turned into an ext4 raw
disk without loop mounts) is cached outside the repo, one per release, keyed by
the recipe, and each Guest boots a throwaway qcow2 overlay on top of it. The
packages come from the Debian mirror this host's apt uses. See README.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The build's own reading of apt's sources, shared with the Makefile.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "packaging"))
import aptsources

# Bump when the build steps change in a way the hash below can't see.
RECIPE_VERSION = "2"
# Debian 11, 12 and 13: kernels 5.10, 6.1 and 6.12, each the release's own
# linux-image-amd64. bookworm is what the machines here run.
RELEASES = ("bullseye", "bookworm", "trixie")
DEFAULT_RELEASE = "bookworm"
DEFAULT_CACHE = "/var/cache/esr-test-guest"
DISK_SIZE = "4G"  # sparse; room for tests to install packages

# On top of --variant=minbase. dbus + libpam-systemd give ssh logins a real
# logind session, as on any ordinary server (a session recorder cares).
PACKAGES = [
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "libpam-systemd",
    "linux-image-amd64",
    "initramfs-tools",
    "kmod",
    "e2fsprogs",
    "openssh-server",
    "libpam-runtime",
    "zlib1g",
    "iproute2",
    "procps",
    "python3",
    "sudo",
]


def packages(release: str, kernel: str | None = None) -> list[str]:
    # trixie renamed libelf1 in the 64-bit time_t transition (it Provides
    # libelf1, so esr's Depends still holds).
    listed = [*PACKAGES, "libelf1" if release in ("bullseye", "bookworm") else "libelf1t64"]
    if kernel and kernel != release:  # installed from its own release afterwards
        listed.remove("linux-image-amd64")
    return listed


# Files written into the rootfs after debootstrap (path -> content).
FILES = {
    "/etc/hostname": "esr-guest\n",
    "/etc/hosts": "127.0.0.1 localhost\n127.0.1.1 esr-guest\n",
    "/etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
    # debootstrap copied the host's resolv.conf; point at slirp's DNS instead.
    "/etc/resolv.conf": "nameserver 10.0.2.3\n",
    # Match the virtio NIC whatever predictable name it gets (ens3, enp0s3...).
    "/etc/systemd/network/20-wired.network": "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n",
}

# Run in the chroot after FILES are written.
CHROOT_CMDS = [
    "systemctl enable systemd-networkd.service",
    # Timers that would burn emulated CPU (or try the network) mid-test.
    "systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer"
    " fstrim.timer dpkg-db-backup.timer",
    # Empty root password: lets a human log in on the serial console when
    # debugging. sshd still refuses empty passwords; ssh uses the baked key.
    "passwd -d root",
    "apt-get clean",
]

# Another release's kernel, in the chroot before FILES (its network is the
# host's then): {mirror} and {kernel} filled in. Its initramfs is gzip, which
# every kernel reads.
KERNEL_CMDS = [
    "echo COMPRESS=gzip > /etc/initramfs-tools/conf.d/compress",
    "echo 'deb {mirror} {kernel} main' > /etc/apt/sources.list.d/kernel.list",
    "apt-get update -q",
    "apt-get install -y -q --no-install-recommends linux-image-amd64/{kernel}",
    "rm /etc/apt/sources.list.d/kernel.list",
    "apt-get update -q",
]

KERNEL_ARGS = "root=/dev/vda rw console=ttyS0 panic=0"


class GuestError(Exception):
    """The guest could not be built, booted or reached."""


class GuestUnavailable(GuestError):
    """The host lacks what is needed (tools, root): tests should skip."""


def cache_dir() -> Path:
    return Path(os.environ.get("ESR_GUEST_CACHE", DEFAULT_CACHE))


def mirror(release: str) -> str:
    """The Debian archive to debootstrap release from: ESR_GUEST_MIRROR_<RELEASE>
    (e.g. an archive mirror for a release the main mirrors dropped), else
    ESR_GUEST_MIRROR, else the archive this host's apt is configured with."""
    return (
        os.environ.get(f"ESR_GUEST_MIRROR_{release.upper()}")
        or os.environ.get("ESR_GUEST_MIRROR")
        or aptsources.archive_uri()
    )


def _check_release(release: str) -> None:
    if release not in RELEASES:
        raise ValueError(f"unknown release {release!r}: one of {', '.join(RELEASES)}")


def recipe_key(release: str = DEFAULT_RELEASE, kernel: str | None = None) -> str:
    _check_release(release)
    recipe: tuple = (
        RECIPE_VERSION,
        release,
        packages(release, kernel),
        FILES,
        CHROOT_CMDS,
        DISK_SIZE,
    )
    name = release
    if kernel and kernel != release:
        _check_release(kernel)
        recipe += (("kernel", kernel, KERNEL_CMDS),)
        name = f"{release}-{kernel}-kernel"
    h = hashlib.sha256(repr(recipe).encode()).hexdigest()
    return f"{name}-{RECIPE_VERSION}-{h[:10]}"


@dataclass(frozen=True)
class ImagePaths:
    dir: Path
    disk: Path  # raw ext4 image of the rootfs; never written to
    kernel: Path
    initrd: Path
    key: Path  # ssh private key, authorized for root in the image

    @classmethod
    def at(cls, d: Path) -> ImagePaths:
        return cls(d, d / "disk.raw", d / "vmlinuz", d / "initrd.img", d / "id_ed25519")


# debootstrap, mke2fs and chroot live in sbin, which a non-login PATH may lack.
_PATH = os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"


def unavailable(
    cache: Path | None = None, release: str = DEFAULT_RELEASE, kernel: str | None = None
) -> str | None:
    """Why a guest can't run on this host (None if it can): a skip reason."""
    need = ["qemu-system-x86_64", "qemu-img", "ssh", "scp"]
    if not ImagePaths.at(Path(cache or cache_dir()) / recipe_key(release, kernel)).disk.exists():
        need += ["debootstrap", "mke2fs", "ssh-keygen", "chroot"]
        if os.geteuid() != 0:
            return "building the guest image needs root (debootstrap)"
        try:
            mirror(release)
        except (aptsources.AptSourcesError, OSError) as err:
            return f"no Debian mirror to build the guest from ({err}); set ESR_GUEST_MIRROR"
    missing = [t for t in need if not shutil.which(t, path=_PATH)]
    if missing:
        return (
            "guest tools missing: " + " ".join(missing) + " (apt-get install"
            " qemu-system-x86 qemu-utils debootstrap e2fsprogs openssh-client)"
        )
    return None


def _run(cmd, log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a build step; on failure raise with the tail of its output."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8", PATH=_PATH)
    r = subprocess.run(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )
    if log:
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(map(str, cmd))}\n{r.stdout}\n")
    if r.returncode != 0:
        tail = "\n".join(r.stdout.splitlines()[-30:])
        raise GuestError(f"{shlex.join(map(str, cmd))} exited {r.returncode}:\n{tail}")
    return r


def _rmtree(path: Path) -> None:
    # A killed debootstrap can leave /proc, /sys... mounted in the rootfs:
    # unmount those (deepest first), and never let rm cross into a mount.
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    for m in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", m], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def ensure_image(
    cache: Path | str | None = None, release: str = DEFAULT_RELEASE, kernel: str | None = None
) -> ImagePaths:
    """Return the cached image of release (with the kernel of another
    release, if given), building it first if needed (~2-3 min).

    The build happens in a temp dir inside the cache and is renamed into place
    only when complete, so an interrupted build is never used; a lock keeps
    concurrent test runs from building twice."""
    cache = Path(cache or cache_dir())
    final = ImagePaths.at(cache / recipe_key(release, kernel))
    if final.disk.exists():
        return final
    reason = unavailable(cache, release, kernel)
    if reason:
        raise GuestUnavailable(reason)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.disk.exists():  # someone else built it while we waited
            return final
        for stale in cache.glob(".build-*"):  # leftovers of interrupted builds
            _rmtree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            _build(ImagePaths.at(tmp), tmp / "rootfs", release, kernel)
            _rmtree(tmp / "rootfs")
            tmp.chmod(0o755)  # mkdtemp made it 0700
            tmp.rename(final.dir)
        finally:
            _rmtree(tmp)
    return final


def _build(img: ImagePaths, root: Path, release: str, kernel: str | None = None) -> None:
    log = img.dir / "build.log"
    t0 = time.monotonic()
    source = mirror(release)
    try:
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=" + ",".join(packages(release, kernel)),
                release,
                root,
                source,
            ],
            log,
        )
    except GuestError as err:
        raise GuestError(
            f"{err}\n(if {source} no longer carries {release}, point"
            f" ESR_GUEST_MIRROR_{release.upper()} at a mirror that does)"
        ) from None
    t1 = time.monotonic()
    if kernel and kernel != release:
        _install_kernel(root, kernel, log)
    _run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "esr-test-guest", "-f", img.key], log
    )
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(img.key.with_suffix(".pub"), ssh_dir / "authorized_keys")
    (ssh_dir / "authorized_keys").chmod(0o600)
    for path, content in FILES.items():
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)  # may be a symlink (resolv.conf)
        p.write_text(content)
    for cmd in CHROOT_CMDS:
        _run(["chroot", root, "sh", "-c", cmd], log)
    # Boot with -kernel/-initrd: take them out of the rootfs's /boot.
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestError(f"expected one kernel in {root}/boot, found {kernels}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    shutil.copy(kernels[0], img.kernel)
    shutil.copy(root / "boot" / f"initrd.img-{release}", img.initrd)
    # mke2fs -d populates the filesystem straight from a directory: no loop
    # mount, no guestfish. Written under a temp name: disk.raw marks "done".
    _run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "esr-root",
            "-d",
            root,
            img.dir / "disk.tmp",
            DISK_SIZE,
        ],
        log,
    )
    (img.dir / "disk.tmp").rename(img.disk)
    with open(log, "a") as f:
        f.write(f"debootstrap {t1 - t0:.0f}s, total {time.monotonic() - t0:.0f}s\n")


def _install_kernel(root: Path, kernel: str, log: Path) -> None:
    """Install the kernel of another release into the rootfs (KERNEL_CMDS)."""
    _run(["mount", "-t", "proc", "proc", root / "proc"], log)
    try:
        for cmd in KERNEL_CMDS:
            _run(
                ["chroot", root, "sh", "-c", cmd.format(mirror=mirror(kernel), kernel=kernel)], log
            )
    finally:
        _run(["umount", root / "proc"], log)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guest:
    """One qemu VM on a copy-on-write overlay of the cached image.

    Use as a context manager; qemu is always killed on exit. Pass workdir
    (e.g. pytest's tmp_path) to keep console.log after the test; otherwise a
    temp dir is used and removed. `console_log` is the serial console;
    `boot_seconds` how long the first boot took until ssh answered."""

    def __init__(
        self,
        image: ImagePaths | None = None,
        *,
        release: str = DEFAULT_RELEASE,
        kernel: str | None = None,
        workdir: Path | str | None = None,
        smp: int = 2,
        memory: int = 2048,
        boot_timeout: float = 180,
        accel: str | None = None,
        cpu: str = "qemu64",
        qemu_args: list[str] = (),
    ):
        _check_release(release)
        self.image, self.release, self.kernel = image, release, kernel
        # qemu64 (qemu's TCG default) measured clearly faster than -cpu max
        # under TCG, especially for the boot after a reboot (~35 s vs ~60 s).
        self.cpu = cpu
        self.smp, self.memory, self.boot_timeout = smp, memory, boot_timeout
        # One host thread for both vCPUs: with a thread each, a guest whose
        # syscall tracepoints come and go could lock up (README).
        self.accel = accel or os.environ.get("ESR_GUEST_ACCEL", "tcg,thread=single")
        self.qemu_args = list(qemu_args)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else None
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.boot_seconds = 0.0

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.workdir / "qemu.log"

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Guest:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.image = self.image or ensure_image(release=self.release, kernel=self.kernel)
        if self._own_workdir:
            self.workdir = Path(tempfile.mkdtemp(prefix="esr-guest-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        overlay = self.workdir / "overlay.qcow2"
        overlay.unlink(missing_ok=True)
        _run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                self.image.disk.resolve(),
                overlay,
            ]
        )
        t0 = time.monotonic()
        # The free port can be taken between our probe and qemu's bind; qemu
        # then exits at once, so retry with another port.
        for _ in range(5):
            self.port = _free_port()
            self._launch(overlay)
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                break
            if "forwarding" not in self.qemu_log.read_text():
                break
        self.wait_ssh(self.boot_timeout)
        self.boot_seconds = time.monotonic() - t0

    def _launch(self, overlay: Path) -> None:
        cmd = [
            "qemu-system-x86_64",
            "-accel",
            self.accel,
            "-cpu",
            self.cpu,
            "-smp",
            str(self.smp),
            "-m",
            str(self.memory),
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
            "-kernel",
            self.image.kernel,
            "-initrd",
            self.image.initrd,
            "-append",
            KERNEL_ARGS,
            # cache=unsafe: the overlay is thrown away, so skip host fsyncs.
            "-drive",
            f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
            # restrict=on: the guest reaches nothing outside (tests must not
            # depend on the network); hostfwd still lets us in for ssh.
            "-netdev",
            f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device",
            "virtio-net-pci,netdev=n0",
            # Entropy for early-boot getrandom() (sshd) under slow TCG.
            "-device",
            "virtio-rng-pci",
            "-serial",
            f"file:{self.console_log}",
            *self.qemu_args,
        ]
        with open(self.qemu_log, "w") as log:
            self.proc = subprocess.Popen(
                list(map(str, cmd)), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.workdir:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            else:
                (self.workdir / "overlay.qcow2").unlink(missing_ok=True)

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            qemu = self.qemu_log.read_text(errors="replace") if self.qemu_log.exists() else ""
            raise GuestError(
                f"qemu is not running (exit {self.proc and self.proc.returncode})"
                f"\n{qemu}\n--- console ---\n{self.console_tail()}"
            )

    # -- ssh ---------------------------------------------------------------

    def _ssh_opts(self, key: Path | str | None = None) -> list[str]:
        return [
            "-F",
            "/dev/null",
            "-i",
            str(key or self.image.key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ServerAliveInterval=15",
        ]

    def ssh(
        self,
        cmd: str | list[str],
        user: str = "root",
        check: bool = True,
        timeout: float = 300,
        input: str | None = None,
        key: Path | str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run cmd (a shell string, or an argv that gets quoted) in the guest.
        Text output is captured; check=True raises GuestError on non-zero.
        key: a private key other than the image's (e.g. a test user's own)."""
        if not isinstance(cmd, str):
            cmd = shlex.join(cmd)
        argv = ["ssh", *self._ssh_opts(key), "-p", str(self.port), f"{user}@127.0.0.1", cmd]
        r = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            # 255 is ssh's own failure: what the guest's kernel said tells why.
            console = f"\n--- console ---\n{self.console_tail()}" if r.returncode == 255 else ""
            raise GuestError(
                f"guest command {cmd!r} as {user} exited {r.returncode}:\n"
                f"stdout: {r.stdout}\nstderr: {r.stderr}{console}"
            )
        return r

    def popen(
        self, cmd: str, user: str = "root", key: Path | str | None = None, **kw
    ) -> subprocess.Popen:
        """Start cmd in the guest and return at once: a session that runs
        while the test does something else."""
        argv = ["ssh", *self._ssh_opts(key), "-p", str(self.port), f"{user}@127.0.0.1", cmd]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)

    def copy_to(self, local: Path | str, remote: str, user: str = "root") -> None:
        """scp a file or directory (recursively) into the guest."""
        _run(
            [
                "scp",
                *self._ssh_opts(),
                "-r",
                "-P",
                str(self.port),
                local,
                f"{user}@127.0.0.1:{remote}",
            ]
        )

    def _boot_id(self) -> str | None:
        """The guest's boot id, or None if ssh doesn't answer (yet)."""
        try:
            r = self.ssh("cat /proc/sys/kernel/random/boot_id", check=False, timeout=30)
        except subprocess.TimeoutExpired:
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    def wait_ssh(self, timeout: float | None = None, not_boot: str | None = None) -> str:
        """Wait until root can ssh in (into a boot other than `not_boot`);
        returns the boot id."""
        deadline = time.monotonic() + (timeout or self.boot_timeout)
        while time.monotonic() < deadline:
            self._check_alive()
            boot = self._boot_id()
            if boot and boot != not_boot:
                return boot
            time.sleep(1)
        raise GuestError(
            f"no ssh on port {self.port} after {timeout or self.boot_timeout:.0f}s;"
            f" console ({self.console_log}):\n{self.console_tail()}"
        )

    def reboot(self, timeout: float | None = None) -> None:
        """`systemctl reboot` in the guest; qemu resets the VM (same kernel and
        initrd, same overlay) and this returns once ssh answers in the new boot."""
        old = self._boot_id()
        if old is None:
            raise GuestError("reboot: guest is not reachable by ssh")
        # --no-block: return before sshd is stopped, so our ssh exits cleanly.
        try:
            self.ssh("systemctl --no-block reboot", check=False, timeout=30)
        except subprocess.TimeoutExpired:
            pass
        # Polling for a *different* boot id covers "ssh went away and came back"
        # without racing to catch the moment it is down.
        self.wait_ssh(timeout, not_boot=old)

    def poweroff(self, timeout: float = 120) -> None:
        """Shut the guest down cleanly; qemu exits when it powers off."""
        try:
            self.ssh("systemctl --no-block poweroff", check=False, timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(
                f"guest did not power off in {timeout}s:\n{self.console_tail()}"
            ) from None

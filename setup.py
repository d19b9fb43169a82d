"""Build esr: the BPF object (clang + bpftool) and the Cython extensions
(statically linked against libbpf)."""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import Command, setup
from setuptools.command.build_ext import build_ext
from setuptools.extension import Extension

HERE = os.path.dirname(os.path.abspath(__file__))
BPF_DIR = os.path.join(HERE, "bpf")
# The recorder's programs, statically linked into one object...
RECORDER_SOURCES = [
    "session.bpf.c",
    "exec.bpf.c",
    "open.bpf.c",
    "connect.bpf.c",
    "terminal.bpf.c",
    "ptrace.bpf.c",
    "io_uring.bpf.c",
]
# ...and the probes `esr check` loads one by one.
FEATURE_PROBE_SOURCE = "feature_probe.bpf.c"
PACKAGE_BPF_DIR = os.path.join(HERE, "esr", "bpf")
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
# Debian's libbpf.a is not position-independent, so it cannot go into a
# Python extension: `make` builds Debian's libbpf source with -fPIC here.
LIBBPF = os.environ.get("ESR_LIBBPF", os.path.join(HERE, "build", "libbpf", "usr"))
LIBBPF_A = os.path.join(LIBBPF, "lib", "libbpf.a")
LIBBPF_INCLUDE = os.path.join(LIBBPF, "include")


def run(cmd):
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


BPF_BUILD_DIR = os.path.join(HERE, "build", "bpf")


class build_bpf(Command):
    """Compile bpf/*.bpf.c with clang into esr/bpf/esr.bpf.o (the recorder)
    and esr/bpf/feature_probe.bpf.o, and generate their subskeletons, through
    which the C side names maps, programs and settings.

    vmlinux.h is generated from the build host's BTF; CO-RE relocations let
    the object load on other kernels. The options build another object of
    the same programs elsewhere (the upgrade test's: make upgrade-deb)."""

    description = "build the BPF object"
    user_options = [
        ("build-dir=", None, "objects and subskeletons (default build/bpf)"),
        ("package-dir=", None, "the linked objects (default esr/bpf)"),
        ("cflags=", None, "more clang flags"),
    ]

    def initialize_options(self):
        self.build_dir = BPF_BUILD_DIR
        self.package_dir = PACKAGE_BPF_DIR
        self.cflags = ""

    def finalize_options(self):
        pass

    def run(self):
        out = self.build_dir
        os.makedirs(out, exist_ok=True)
        os.makedirs(self.package_dir, exist_ok=True)
        vmlinux = os.path.join(out, "vmlinux.h")
        if not os.path.exists(vmlinux):
            if not os.path.exists(VMLINUX_BTF):
                sys.exit(f"esr build: {VMLINUX_BTF} is missing: building the BPF object needs a kernel with BTF")
            with open(vmlinux + ".tmp", "w") as f:
                subprocess.run(["bpftool", "btf", "dump", "file", VMLINUX_BTF, "format", "c"],
                               check=True, stdout=f)
            os.replace(vmlinux + ".tmp", vmlinux)
        headers = glob.glob(os.path.join(BPF_DIR, "*.h")) + [vmlinux]
        for name, sources in (("esr", RECORDER_SOURCES), ("feature_probe", [FEATURE_PROBE_SOURCE])):
            target = self.link(f"{name}.bpf.o", [self.compile(src, out, headers) for src in sources])
            self.subskeleton(target, name, out)

    def compile(self, source, out, headers):
        src = os.path.join(BPF_DIR, source)
        obj = os.path.join(out, source[:-2] + ".o")
        if os.path.exists(obj) and os.path.getmtime(obj) >= max(
                os.path.getmtime(p) for p in [src, *headers]):
            return obj
        run(["clang", "-g", "-O2", "-Wall", "-Werror", "-target", "bpf", "-D__TARGET_ARCH_x86",
             *self.cflags.split(), "-I", out, "-I", BPF_DIR, "-I", LIBBPF_INCLUDE, "-c", src,
             "-o", obj])
        return obj

    def link(self, name, objects):
        target = os.path.join(self.package_dir, name)
        if not os.path.exists(target) or os.path.getmtime(target) < max(
                os.path.getmtime(o) for o in objects):
            run(["bpftool", "gen", "object", target + ".tmp", *objects])
            os.replace(target + ".tmp", target)
        return target

    @staticmethod
    def subskeleton(obj, name, out):
        header = os.path.join(out, f"{name}.subskel.h")
        if os.path.exists(header) and os.path.getmtime(header) >= os.path.getmtime(obj):
            return
        print(f"bpftool gen subskeleton {obj} name {name}_bpf > {header}", flush=True)
        with open(header + ".tmp", "w") as f:
            subprocess.run(["bpftool", "gen", "subskeleton", obj, "name", f"{name}_bpf"],
                           check=True, stdout=f)
        os.replace(header + ".tmp", header)


def write_commit():
    """esr/_commit.py names the commit built, for `esr --version`."""
    try:
        commit = subprocess.run(["git", "-C", HERE, "describe", "--always", "--dirty",
                                 "--abbrev=12"], check=True, capture_output=True,
                                text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    path = os.path.join(HERE, "esr", "_commit.py")
    text = f'COMMIT = "{commit}"\n'
    if commit == "unknown" and os.path.exists(path):
        return  # git is not usable here (another user's tree): keep what was built
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


class build_ext_with_bpf(build_ext):
    def run(self):
        write_commit()
        self.run_command("build_bpf")
        super().run()


def extensions():
    from Cython.Build import cythonize

    if not os.path.exists(LIBBPF_A):
        sys.exit(f"esr build: {LIBBPF_A} is missing: run `make build`, or point ESR_LIBBPF "
                 "at a prefix holding a position-independent libbpf.a and its headers")
    common = dict(include_dirs=[os.path.join(HERE, "bpf"), os.path.join(HERE, "esr", "_fast"),
                                BPF_BUILD_DIR, LIBBPF_INCLUDE],
                  extra_compile_args=["-O2"])
    return cythonize(
        [
            Extension("esr._fast.probe", ["esr/_fast/probe.pyx", "esr/_fast/object.c",
                                          "esr/_fast/drain.c"],
                      extra_objects=[LIBBPF_A], libraries=["elf", "z"],
                      depends=["esr/_fast/object.h", "esr/_fast/drain.h", "esr/_fast/handover.h",
                               "bpf/esr_events.h"],
                      **common),
            Extension("esr._fast.decode", ["esr/_fast/decode.pyx"],
                      depends=["bpf/esr_events.h"], **common),
        ],
        compiler_directives={"language_level": 3},
    )


setup(
    ext_modules=extensions(),
    cmdclass={"build_bpf": build_bpf, "build_ext": build_ext_with_bpf},
)

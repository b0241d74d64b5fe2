"""Builds the command line of one sandboxed process: cgroup attach, prlimit, setpriv, bwrap, python."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .config import Limits

MiB = 1 << 20
# Host top-level entries that python under /usr may need (usr-merged systems: symlinks into /usr).
_TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Processes of the slot uid that are not the program's: the cgroup-attach shell (exec'd away),
# the two bwrap processes, the runner itself and the tests process T.
HARNESS_PROCS = 5


@dataclass(frozen=True)
class SpawnSpec:
    """Everything that goes into one warm process's command line."""

    uid: int
    limits: Limits
    python: str
    runner_src: str
    result_fd: int
    nonce_fd: int
    seccomp_fd: int | None
    netns: bool
    cgroup_procs: tuple[Path, ...]


def _root_links() -> list[str]:
    """bwrap args recreating /bin, /lib, ... as on the host (symlink into /usr, or read-only bind)."""
    args: list[str] = []
    for path in _TOP_LEVEL:
        if os.path.islink(path):
            target = os.readlink(path)
            if target.lstrip("/").startswith("usr/"):
                args += ["--symlink", target, path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


_PATHS_SRC = (
    "import json, os, sys, sysconfig; "
    "print(json.dumps([os.path.realpath(sys.executable), sysconfig.get_paths()['stdlib'], "
    "sysconfig.get_paths()['platstdlib']]))"
)
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


# Extension modules whose shared libraries are not bound (terminal UI, NIS/Kerberos, Berkeley DB, the
# interpreter's own test modules): importing them fails in the sandbox. Each bind costs start-up time.
_UNBOUND_EXTENSIONS = re.compile(
    r"^(nis|readline|_curses|_curses_panel|_dbm|_gdbm|ossaudiodev|_test\w*|_ctypes_test|_xx\w*|xxlimited\w*)\."
)


@functools.lru_cache(maxsize=4)
def interpreter_tree(python: str) -> tuple[str, ...]:
    """Host paths the interpreter needs, and nothing else of /usr: its executable, its standard
    library (not site-packages, not /usr/local) and the shared libraries that the executable and
    its extension modules link (as ``ldd`` resolves them, under /usr; not those of
    `_UNBOUND_EXTENSIONS`). Raises OSError when they cannot be found (the caller refuses to start)."""
    out = subprocess.run([python, "-I", "-S", "-c", _PATHS_SRC], capture_output=True, timeout=30, check=True)
    exe, stdlib, platstdlib = json.loads(out.stdout)
    paths = {exe, stdlib, platstdlib}
    if python != exe:
        paths.add(python)
    objects = [exe]
    for root in {stdlib, platstdlib}:
        dynload = Path(root) / "lib-dynload"
        if dynload.is_dir():
            objects += sorted(str(f) for f in dynload.glob("*.so") if not _UNBOUND_EXTENSIONS.match(f.name))
    ldd = subprocess.run(["ldd", *objects], capture_output=True, timeout=60, check=False, text=True)
    libs = set(_LDD_PATH.findall(ldd.stdout))
    if not libs:
        raise OSError(f"ldd found no shared libraries of {exe}: {ldd.stderr.strip()[:200]}")
    for lib in libs:
        # /lib -> usr/lib on a usr-merged host: bind the name the loader looks up, in its /usr directory
        paths.add(os.path.join(os.path.realpath(os.path.dirname(lib)), os.path.basename(lib)))
    return tuple(sorted(p for p in paths if p.startswith("/usr/")))


def _interpreter_binds(python: str) -> list[str]:
    args: list[str] = []
    for path in interpreter_tree(python):
        args += ["--ro-bind", path, path]
    return args


def sandbox_argv(spec: SpawnSpec) -> list[str]:
    """argv of a warm sandbox process: it prints a ready byte on result_fd and waits for a job."""
    lim = spec.limits
    argv: list[str] = []
    if spec.cgroup_procs:  # join the slot cgroup(s) before anything of the sandbox exists
        attach = 'for f in $1; do echo $$ > "$f" || exit 111; done; shift; exec "$@"'
        argv += ["/bin/sh", "-c", attach, "sh", " ".join(str(p) for p in spec.cgroup_procs)]
    fsize = lim.file_size_mb * MiB
    shm = fsize // 4  # /tmp and /dev/shm together hold at most file_size_mb
    argv += [
        "prlimit",
        # The address space is a backstop at twice the memory limit: the cgroup's OOM killer, whose
        # kill counter the parent reads, is what ends a program that really uses too much memory.
        f"--as={2 * lim.memory_mb * MiB}",
        f"--cpu={lim.cpu_s}:{lim.cpu_s + 1}",
        f"--nproc={lim.nproc + HARNESS_PROCS}",
        f"--fsize={fsize}",
        f"--nofile={lim.open_files + 16}",  # + the runner's own pipes
        "--core=0",
        "--",
        "setpriv",
        f"--reuid={spec.uid}",
        f"--regid={spec.uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
        "bwrap",
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",  # the runner is pid 1: the program cannot SIGKILL it; its exit kills the namespace
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", "/tmp",
        "--cap-drop", "ALL",
        *_interpreter_binds(spec.python),  # not all of /usr: no /usr/local, no site-packages
        *_root_links(),
        "--proc", "/proc",
        "--dev", "/dev",
        "--remount-ro", "/dev",  # /dev itself is a tmpfs capped only by memory: nothing is kept there
        "--size", str(shm),
        "--tmpfs", "/dev/shm",
        "--size", str(fsize - shm),
        "--tmpfs", "/tmp",
        "--remount-ro", "/",
        "--chdir", "/tmp",
    ]  # fmt: skip
    if not spec.netns:
        argv += ["--share-net"]
    if spec.seccomp_fd is not None:
        argv += ["--seccomp", str(spec.seccomp_fd)]
    argv += [
        spec.python, "-I", "-c", spec.runner_src,
        str(spec.result_fd), str(spec.nonce_fd), str(lim.output_bytes),
    ]  # fmt: skip
    return argv

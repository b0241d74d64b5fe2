"""Compiles the sandbox's seccomp filter (classic BPF) with libseccomp.

libseccomp's Python bindings come from Debian's `python3-seccomp`, importable by /usr/bin/python3
but not by the project's virtualenv, so the program is generated once per Sandbox by running
/usr/bin/python3 on a short script and reading the BPF bytes it prints.
"""

from __future__ import annotations

import subprocess

from .errors import SandboxUnavailableError

# Syscalls answered with EPERM. Sockets are allowed only for AF_UNIX (Python's own machinery).
DENIED_SYSCALLS: tuple[str, ...] = (
    "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
    "unshare", "setns", "bpf", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd", "perf_event_open",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "swapon", "swapoff", "reboot", "acct", "quotactl", "name_to_handle_at", "open_by_handle_at",
    "sync", "syncfs",  # flush every filesystem of the host (an I/O storm other tenants pay for)
)  # fmt: skip

_GENERATOR = """
import errno, os, socket, sys, tempfile
import seccomp
f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
for name in sys.argv[1:]:
    try:
        f.add_rule(seccomp.ERRNO(errno.EPERM), name)
    except (RuntimeError, ValueError):  # syscall unknown to this libseccomp: nothing to deny
        pass
f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socketpair", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
# clone/clone3 with CLONE_NEWUSER etc. are already refused by bwrap --disable-userns.
with tempfile.TemporaryFile() as t:
    f.export_bpf(t)
    t.seek(0)
    sys.stdout.buffer.write(t.read())
"""


def build_seccomp_bpf(python: str = "/usr/bin/python3") -> bytes:
    """Return the BPF program (bytes for `bwrap --seccomp FD`) denying `DENIED_SYSCALLS`."""
    try:
        proc = subprocess.run(
            [python, "-I", "-c", _GENERATOR, *DENIED_SYSCALLS], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailableError(
            f"seccomp layer: cannot run {python}: {exc}; run sandboxes/setup.sh"
        ) from None
    if proc.returncode != 0 or not proc.stdout:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise SandboxUnavailableError(
            f"seccomp layer: libseccomp bindings unusable by {python} ({reason[0]}); "
            "install them with sandboxes/setup.sh (Debian package python3-seccomp)"
        )
    return proc.stdout

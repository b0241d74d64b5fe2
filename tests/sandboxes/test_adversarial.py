"""Adversarial suite: each attack must be blocked or bounded, the host unchanged, hacks scored FAIL."""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import pytest
from posttrain.sandboxes import Limits, Sandbox, Status

REPO = Path(__file__).resolve().parents[2]
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]


def _host_pids_of_slots(sandbox: Sandbox) -> dict[int, str]:
    """pid -> cmdline of host processes running as one of the sandbox's slot uids."""
    lo = sandbox.uid_base
    hi = lo + sandbox.config.slots
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if lo <= os.stat(f"/proc/{entry}").st_uid < hi:
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


@pytest.mark.parametrize("target", ["/etc/posttrain_sandbox_probe", str(REPO / "sandboxes" / "pwned.txt")])
def test_writes_to_host_paths_do_not_reach_the_host(sandbox: Sandbox, target: str) -> None:
    code = f"import os\nos.makedirs(os.path.dirname({target!r}), exist_ok=True)\nopen({target!r}, 'w').write('x')\n"
    v = sandbox.run(code)
    if not target.startswith("/tmp/"):  # a checkout under /tmp lands in the sandbox's private /tmp
        assert v.status is Status.FAIL and ("Read-only" in v.stderr or "No such file" in v.stderr)
    assert not os.path.exists(target)


def test_usr_is_read_only_and_remount_is_blocked(sandbox: Sandbox) -> None:
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "r = libc.mount(None, b'/usr', None, 32 | 4096, None)\n"  # MS_REMOUNT | MS_BIND
        "print('remount', r, ctypes.get_errno())\n"
        "open('/usr/posttrain_probe', 'w').write('x')\n"
    )
    v = sandbox.run(code)
    assert v.stdout.startswith("remount -1 1") and "Read-only file system" in v.stderr
    assert not os.path.exists("/usr/posttrain_probe")


def test_cannot_read_root_home_or_host_secret_env(sandbox: Sandbox, tmp_path: Path) -> None:
    token = secrets.token_hex(8)
    secret_file = Path("/root") / f".posttrain_sandbox_probe_{token}"
    secret_file.write_text(token)
    try:
        code = (
            "import os, glob\n"
            "print(sorted(os.environ.items()))\n"
            "for p in glob.glob('/proc/*/environ'):\n"
            "    try: print(open(p, 'rb').read())\n"
            "    except OSError: pass\n"
            f"print(open({str(secret_file)!r}).read())\n"
        )
        v = sandbox.run(code)
    finally:
        secret_file.unlink()
    assert v.status is Status.FAIL and "No such file" in v.stderr
    secret = os.environ["POSTTRAIN_SANDBOX_TEST_SECRET"]  # set in the host env by the fixture
    assert (
        token not in v.stdout and secret not in v.stdout and "POSTTRAIN_SANDBOX_TEST_SECRET" not in v.stdout
    )


def test_network_socket_and_connect_to_host_listener_blocked(sandbox: Sandbox) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    code = (
        "import socket\n"
        "for fam in (socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, socket.AF_PACKET):\n"
        "    try:\n"
        "        s = socket.socket(fam, socket.SOCK_RAW if fam == socket.AF_PACKET else socket.SOCK_STREAM "
        "if fam != socket.AF_NETLINK else socket.SOCK_RAW)\n"
        "        print('OPENED', fam)\n"
        "    except OSError as e:\n"
        "        print('blocked', fam, e.errno)\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "s.sendall(b'pwned')\nprint('CONNECTED')\n"
    )
    try:
        v = sandbox.run(code)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    assert "OPENED" not in v.stdout and "CONNECTED" not in v.stdout and v.stdout.count("blocked") == 4


def test_ptrace_and_nested_user_namespace_blocked(sandbox: Sandbox) -> None:
    code = (
        "import ctypes, os, subprocess\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('ptrace', libc.ptrace(0, 0, 0, 0))\n"
        "pid = os.fork()\n"
        "if pid == 0:\n    import time; time.sleep(5); os._exit(0)\n"
        "print('attach', libc.ptrace(16, pid, 0, 0))\n"  # PTRACE_ATTACH
        "print('userns', libc.unshare(0x10000000))\n"  # CLONE_NEWUSER
        "print('mountns', libc.unshare(0x00020000))\n"  # CLONE_NEWNS
        "try:\n    rc = subprocess.run(['/usr/bin/unshare', '-U', 'true']).returncode\n"
        "except FileNotFoundError:\n    rc = 'absent'\n"  # the minimal /usr has no unshare binary at all
        "print('unshare-cmd', rc)\n"
        "os.kill(pid, 9)\n"
    )
    v = sandbox.run(code)
    lines = dict(line.rsplit(" ", 1) for line in v.stdout.splitlines())
    assert lines["ptrace"] == "-1" and lines["attach"] == "-1"
    assert lines["userns"] == "-1" and lines["mountns"] == "-1" and lines["unshare-cmd"] != "0"


def test_fork_bomb_is_bounded_and_leaves_nothing(sandbox: Sandbox, short: Limits) -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    v = sandbox.run(code, limits=short)
    assert v.status is Status.TIMEOUT and time.monotonic() - t0 < short.wall_s + 5
    # only the warm processes are left: bwrap + the runner (pid 1 of its namespace) per slot
    # (polled: the slot's next warm process may still be starting)
    deadline = time.monotonic() + 3
    while (
        len(left := _host_pids_of_slots(sandbox)) > 2 * sandbox.config.slots and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert len(left) <= 2 * sandbox.config.slots, left
    assert sandbox.run("def add(a, b): return a + b", tests=ADD_TESTS).status is Status.PASS


def test_memory_bomb_is_oom(sandbox: Sandbox) -> None:
    v = sandbox.run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n")
    assert v.status is Status.OOM
    multi = (
        "import os\nfor _ in range(4):\n    if os.fork() == 0:\n        break\n"
        "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n"
    )
    assert sandbox.run(multi, tests=["assert True"]).status in (Status.OOM, Status.FAIL)


def test_disk_fill_is_bounded(sandbox: Sandbox) -> None:
    code = (
        "import os\nn = 0\ntry:\n    with open('/tmp/fill', 'wb') as f:\n"
        "        while True:\n            f.write(b'x' * (1 << 20)); f.flush(); n += 1\n"
        "except OSError as e:\n    print(n, type(e).__name__)\n"
    )
    v = sandbox.run(code)
    written_mb = int(v.stdout.split()[0])
    assert written_mb <= sandbox.config.limits.file_size_mb


def test_stdout_flood_is_capped(sandbox: Sandbox) -> None:
    v = sandbox.run("while True:\n    print('x' * 4096)\n")
    assert v.status is Status.FAIL and "output limit" in v.detail
    assert len(v.stdout) <= sandbox.config.limits.output_bytes


def test_infinite_loop_is_timeout(sandbox: Sandbox, short: Limits) -> None:
    v = sandbox.run("def add(a, b):\n    while True:\n        pass\n", tests=ADD_TESTS, limits=short)
    assert v.status is Status.TIMEOUT and short.wall_s <= v.wall_s < short.wall_s + 2


def test_double_fork_daemon_does_not_outlive_the_run(sandbox: Sandbox) -> None:
    code = (
        "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        os.execv('/usr/bin/sleep', ['/usr/bin/sleep', '4242.5'])\n    os._exit(0)\n"
        "print('parent done')\n"
    )
    v = sandbox.run(code)
    assert v.status is Status.PASS and "parent done" in v.stdout
    time.sleep(0.3)
    assert not [c for c in _host_pids_of_slots(sandbox).values() if "4242.5" in c]


@pytest.mark.parametrize(
    "hack",
    [
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        "print('PASSED')\nprint('2/2 tests passed')\nimport os\nos._exit(0)\n",
        "import os\nos.kill(os.getppid(), 9)\n",  # kill the runner: must not become SANDBOX_ERROR
        "import os, json\n"
        "for fd in range(3, 64):\n"
        "    try: os.write(fd, json.dumps({'nonce': 'x', 'units': []}).encode() + b'\\n{\"done\": true}\\n')\n"
        "    except OSError: pass\n",
    ],
    ids=["sys_exit", "os_exit", "forged_passed", "kill_runner", "forge_channels"],
)
def test_reward_hacks_before_the_asserts_fail(sandbox: Sandbox, hack: str) -> None:
    code = hack + "def add(a, b):\n    return 0\n"
    v = sandbox.run(code, tests=ADD_TESTS)
    assert v.status is Status.FAIL and v.passed == 0


def test_always_true_eq_is_fail(sandbox: Sandbox) -> None:
    code = (
        "class Anything:\n    def __eq__(self, other):\n        return True\n"
        "    def __ne__(self, other):\n        return False\n"
        "def add(a, b):\n    return Anything()\n"
    )
    check = (
        "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert 4 == candidate(2, 2)\ncheck(add)"
    )
    v = sandbox.run(code, tests=[*ADD_TESTS, check])
    assert v.status is Status.FAIL and v.passed == 0
    subclass = (
        "class I(int):\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return I(0)\n"
    )
    assert sandbox.run(subclass, tests=ADD_TESTS).passed == 0


def test_io_hacks_fail(sandbox: Sandbox) -> None:
    cases = [("2 3\n", "5\n"), ("1 1\n", "2\n")]
    assert sandbox.run("print('5')\nprint('2')", io_cases=cases).status is Status.FAIL
    assert sandbox.run("import os\nos._exit(0)", io_cases=cases).status is Status.FAIL
    honest = "a, b = map(int, input().split())\nprint(a + b)"
    assert sandbox.run(honest, io_cases=cases).status is Status.PASS

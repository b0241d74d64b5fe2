"""The in-sandbox runner: executed by /usr/bin/python3 inside bwrap, stdlib only.

The parent passes this file's source with ``python3 -I -c SRC RESULT_FD NONCE_FD OUTPUT_BYTES``.
Process layout inside the sandbox:

* R (this runner, the sandbox's main process) marks itself non-dumpable, writes a ready byte on
  RESULT_FD, reads the job (JSON) from stdin, then for each execution unit forks a child C.
* C closes RESULT_FD and NONCE_FD *before* any user code runs, so the program can neither write
  the result channel nor learn the nonce; R reads the nonce only after every C has exited.
* C runs the program (and, in assert mode, the tests after it) and reports on its own "rec"
  pipe; R relays C's exit status, capped stdout/stderr and raw rec lines to the parent, which
  decides the verdict itself. R never interprets what C says.

`encode_value` and `strict_eq` are also imported by the trusted parent, so both sides encode
values identically.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys

_MAX_DEPTH = 64


def encode_value(value: object, depth: int = 0) -> list:
    """Type-strict, JSON-safe encoding of a value built only from exact builtin types.

    Raises TypeError for anything else (subclasses and user classes included), so an object
    with a forged ``__eq__`` can never be encoded as, or compared equal to, an expected value.
    """
    if depth > _MAX_DEPTH:
        raise TypeError("value nested too deeply (or self-referential)")
    t = type(value)
    if value is None:
        return ["None"]
    if t is bool:
        return ["bool", value]
    if t is int:
        return ["int", str(value)]
    if t is float or t is complex:
        return [t.__name__, repr(value)]
    if t is str:
        return ["str", value]
    if t is bytes:
        return ["bytes", value.hex()]
    if t is list or t is tuple:
        return [t.__name__, [encode_value(x, depth + 1) for x in value]]
    if t is set or t is frozenset:
        items = [encode_value(x, depth + 1) for x in value]
        return [t.__name__, sorted(items, key=json.dumps)]
    if t is dict:
        pairs = [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in value.items()]
        return ["dict", sorted(pairs, key=json.dumps)]
    raise TypeError(f"result of type {t.__module__}.{t.__qualname__} is not an exact builtin type")


def strict_eq(a: object, b: object) -> bool:
    """`a == b` with type-strictness: used for every `==`/`!=` inside test asserts.

    Builtin values are compared by their type-strict encodings; other objects must have the
    very same type and compare equal in both directions, with a real ``True`` each time.
    """
    try:
        return encode_value(a) == encode_value(b)
    except (TypeError, ValueError):
        pass
    if type(a) is not type(b):
        return False
    return (a == b) is True and (b == a) is True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fresh_main(name: str) -> dict:
    """A clean module namespace for the program; `import __main__` then yields it, not R."""
    import types

    module = types.ModuleType(name)
    sys.modules["__main__"] = module
    return module.__dict__


def _child_asserts(job: dict, rec_fd: int) -> None:
    """C in assert mode: run the program, then every test, one rec line per step."""
    # Bind what the loop needs to locals before user code can rebind module globals.
    dumps, write, enc, strict, fmt = json.dumps, _write_all, encode_value, strict_eq, _format_exc
    tests = job["tests"]
    g = _fresh_main("__solution__")
    try:
        exec(compile(job["code"], "<solution>", "exec"), g)
    except BaseException as exc:  # noqa: BLE001 - everything the program raises is reported
        write(rec_fd, (dumps({"phase": "code", "error": fmt(exc)}) + "\n").encode())
        return
    write(rec_fd, b'{"phase": "code"}\n')
    g["__pt_strict_eq__"] = strict
    for i, test in enumerate(tests):
        rec: dict = {"i": i}
        try:
            if test["kind"] == "value":
                rec["value"] = enc(eval(compile(test["expr"], f"<test {i}>", "eval"), g))
            else:
                exec(compile(test["src"], f"<test {i}>", "exec"), g)
                rec["ok"] = True
        except BaseException as exc:  # noqa: BLE001
            rec["error"] = fmt(exc)
        write(rec_fd, (dumps(rec) + "\n").encode())
    write(rec_fd, b'{"done": true}\n')


def _child_program(job: dict, rec_fd: int) -> None:
    """C in io / plain mode: run the program as __main__ on the stdin R prepared."""
    g = _fresh_main("__main__")
    try:
        exec(compile(job["code"], "<solution>", "exec"), g)
    except SystemExit as exc:
        code = exc.code
        _flush()
        os._exit(code if isinstance(code, int) and 0 <= code < 256 else (0 if code is None else 1))
    except BaseException as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        _write_all(rec_fd, (json.dumps({"error": _format_exc(exc)}) + "\n").encode())
        _flush()
        os._exit(1)


def _format_exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass


def _run_unit(job: dict, stdin_text: str, private_fds: tuple[int, ...], cap: int) -> dict:
    """Fork one C, capture its output (capped), wait for it, kill its process group."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    rec_r, rec_w = os.pipe()
    in_fd = os.memfd_create("stdin")
    _write_all(in_fd, stdin_text.encode())
    os.lseek(in_fd, 0, os.SEEK_SET)
    pid = os.fork()
    if pid == 0:  # C: drop everything private to R before any user code
        try:
            for fd in (*private_fds, out_r, err_r, rec_r):
                os.close(fd)
            os.setpgid(0, 0)
            for src, dst in ((in_fd, 0), (out_w, 1), (err_w, 2)):
                os.dup2(src, dst)
            for fd in (in_fd, out_w, err_w):
                os.close(fd)
            sys.stdin = open(0, encoding="utf-8", closefd=False)
            sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
            sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
            if job["mode"] == "asserts":
                _child_asserts(job, rec_w)
            else:
                _child_program(job, rec_w)
        finally:
            _flush()
            os._exit(0)
    for fd in (out_w, err_w, rec_w, in_fd):
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    caps = {out_r: cap, err_r: cap, rec_r: max(1 << 20, 4 * cap)}
    bufs: dict[int, bytearray] = {fd: bytearray() for fd in caps}
    over = False
    poller = select.poll()
    for fd in (*caps, pidfd):
        poller.register(fd, select.POLLIN)
    open_fds = set(caps)
    exited = False
    while open_fds and not exited:
        for fd, _ in poller.poll():
            if fd == pidfd:
                exited = True
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
                continue
            bufs[fd] += chunk
            if len(bufs[fd]) > caps[fd]:
                over = exited = True
                _kill_group(pid)
    if not over:  # C exited: drain what it wrote without waiting on pipes a daemon may hold
        for fd in open_fds:
            os.set_blocking(fd, False)
            while len(bufs[fd]) <= caps[fd]:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                bufs[fd] += chunk
    _, status = os.waitpid(pid, 0)
    _kill_group(pid)  # leftovers of this unit that stayed in its process group
    _reap_orphans()
    for fd in (*caps, pidfd):
        os.close(fd)
    return {
        "exit": os.waitstatus_to_exitcode(status),
        "stdout": bytes(bufs[out_r][:cap]).decode("utf-8", "replace"),
        "stderr": bytes(bufs[err_r][:cap]).decode("utf-8", "replace"),
        "rec": bytes(bufs[rec_r][: caps[rec_r]]).decode("utf-8", "replace"),
        "over": over or any(len(bufs[fd]) > caps[fd] for fd in caps),
    }


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap_orphans() -> None:
    """R is pid 1 of the sandbox: reap orphaned descendants so zombies do not eat RLIMIT_NPROC."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _set_non_dumpable() -> None:
    """PR_SET_DUMPABLE=0: C (same uid) can no longer open /proc/<R>/mem or /proc/<R>/fd."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def main(argv: list[str]) -> None:
    """R: ready byte, job from stdin, one unit per execution, nonce last, result on RESULT_FD."""
    result_fd, nonce_fd, cap = int(argv[1]), int(argv[2]), int(argv[3])
    _set_non_dumpable()
    _write_all(result_fd, b"R")
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    private = (result_fd, nonce_fd)
    if job["mode"] == "io":
        units = [_run_unit(job, text, private, cap) for text in job["inputs"]]
    else:
        units = [_run_unit(job, "", private, cap)]
    nonce = os.read(nonce_fd, 256).decode()
    _write_all(result_fd, json.dumps({"nonce": nonce, "units": units}).encode())
    os.close(result_fd)


if __name__ == "__main__":
    main(sys.argv)

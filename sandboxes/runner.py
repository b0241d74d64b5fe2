"""The in-sandbox runner: executed by /usr/bin/python3 inside bwrap, stdlib only.

The parent passes ``plain.py`` + this file as ``python3 -I -c SRC RESULT_FD NONCE_FD OUTPUT_BYTES``.
Process layout inside the sandbox (see sandboxes/README.md for the threat model):

* R (this runner, pid 1 of the sandbox) ignores every signal a program can send, marks itself
  non-dumpable, writes a ready byte on RESULT_FD and reads the job from stdin in two frames:
  the program first, the tests second.
* io / plain mode: per execution unit R forks C, which drops R's private fds, then runs the
  program as ``__main__``. R streams one JSON line per unit (exit status, capped stdout/stderr)
  to the parent as soon as the unit ends.
* asserts mode: R forks C *before* it reads the tests, so C's memory never holds them. C loads
  the program and serves its top-level functions over a pipe pair, speaking plain data only.
  R then reads the tests and forks T, which holds the tests, calls C through proxies and reports
  per-test records on a pipe only T holds. T is non-dumpable: C cannot read its memory or fds.
* R never interprets what C or T say; after both are gone it writes the nonce and ``end``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys

try:  # in the sandbox plain.py's source is prepended instead
    from .plain import NotPlainError, decode, encode, values_equal
except ImportError:
    pass

MAX_MESSAGE = 16 << 20  # one request / reply on the candidate channel
CMP_BUDGET = 256 << 10  # bytes of comparisons a test reports for the parent to re-check
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _format_exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass


def _fresh_main(name: str) -> dict:
    """A clean module namespace for the program; `import __main__` then yields it, not R."""
    import types

    module = types.ModuleType(name)
    sys.modules["__main__"] = module
    return module.__dict__


class _Lines:
    """Line reader on a raw fd with a cap on a line's length."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, bytearray()

    def read(self) -> bytes | None:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > MAX_MESSAGE:
                raise OSError("message over the channel's size cap")
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk


# -- C in asserts mode: the candidate, serving its functions -----------------------------------


def _child_candidate(code: str, req_fd: int, rep_fd: int) -> None:
    """Load the program, announce its top-level names, then answer calls until the channel closes."""
    dumps, loads, write = json.dumps, json.loads, _write_all
    g = _fresh_main("__solution__")
    try:
        exec(compile(code, "<solution>", "exec"), g)
    except BaseException as exc:  # noqa: BLE001 - the program failing is reported to T
        _flush()
        write(rep_fd, (dumps({"load_error": _format_exc(exc)}) + "\n").encode())
        return
    refs: list = []

    def ref(obj: object) -> list:
        refs.append(obj)
        return ["ref", len(refs) - 1, type(obj).__name__]

    names = {}
    for name, value in list(g.items()):
        if name.startswith("__"):
            continue
        if type(value).__name__ == "module":  # T imports the real module itself (or leaves it out)
            names[name] = ["module", str(getattr(value, "__name__", ""))]
            continue
        try:
            names[name] = encode(value) if not callable(value) else ["callable"]
        except NotPlainError:
            names[name] = ["callable"]  # an object: reachable through a ref proxy
    # What the program printed is in the pipe before T hears from it: R kills this process as soon
    # as T is done, and output still in a buffer would be lost.
    _flush()
    write(rep_fd, (dumps({"names": names}) + "\n").encode())
    reader = _Lines(req_fd)
    while True:
        line = reader.read()
        if line is None:
            return
        req = loads(line)
        reply: dict = {"id": req["id"]}
        try:
            target = _resolve(req["target"], g, refs)
            op = req["op"]
            if op == "call":
                args = [decode(a, lambda i, _t: refs[i]) for a in req["args"]]
                kwargs = {k: decode(v, lambda i, _t: refs[i]) for k, v in req["kwargs"].items()}
                reply["value"] = encode(target(*args, **kwargs), ref)
            elif op == "iter":
                reply["value"] = ref(iter(target))
            elif op == "next":
                try:
                    reply["value"] = encode(next(target), ref)
                except StopIteration:
                    reply["stop"] = True
            else:
                raise ValueError(f"unknown op {op!r}")
        except BaseException as exc:  # noqa: BLE001 - the candidate's exception crosses as its name
            reply.pop("value", None)
            reply["raise"] = [type(exc).__name__, str(exc)[:500]]
        _flush()
        write(rep_fd, (dumps(reply) + "\n").encode())


def _resolve(target: list, g: dict, refs: list) -> object:
    kind = target[0]
    if kind == "name":
        return g[target[1]]
    if kind == "ref":
        return refs[target[1]]
    if kind == "attr":
        name = target[2]
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_resolve(target[1], g, refs), name)
    raise ValueError(f"bad target {target!r}")


# -- T in asserts mode: the tests, holding proxies of the candidate ----------------------------


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin one (name and message kept)."""


class ChannelError(BaseException):
    """The candidate's process ended or broke the channel protocol.

    A BaseException, so a test's own ``except Exception`` cannot swallow it: T fails the test
    that met it and every later one (the channel is dead)."""


class _Channel:
    def __init__(self, req_fd: int, rep_fd: int) -> None:
        self.req_fd, self.reader, self.next_id, self.dead = req_fd, _Lines(rep_fd), 0, ""

    def receive(self) -> dict:
        try:
            line = self.reader.read()
            if line is None:
                raise ChannelError("the candidate's process ended")
            msg = json.loads(line)
            if type(msg) is not dict:
                raise ValueError("not an object")
            return msg
        except ChannelError as exc:
            self.dead = str(exc)
            raise
        except (OSError, ValueError, RecursionError) as exc:
            self.dead = f"the candidate broke the channel protocol ({type(exc).__name__})"
            raise ChannelError(self.dead) from None

    def request(self, op: str, target: list, args: tuple = (), kwargs: dict | None = None) -> object:
        if self.dead:
            raise ChannelError(self.dead)
        self.next_id += 1
        msg = {"id": self.next_id, "op": op, "target": target}
        msg["args"] = [encode(a, _ref_arg) for a in args]
        msg["kwargs"] = {str(k): encode(v, _ref_arg) for k, v in (kwargs or {}).items()}
        try:
            _write_all(self.req_fd, (json.dumps(msg) + "\n").encode())
        except OSError:
            self.dead = "the candidate's process ended"
            raise ChannelError(self.dead) from None
        reply = self.receive()
        # A reply answers exactly the request it names: its id, one payload, and `stop` only for
        # `next`. Anything else (a forged `stop` ending a map() early, a plain value where a ref
        # is due) kills the channel: the test fails, never passes.
        payload = set(reply) - {"id"}
        if (
            type(reply.get("id")) is not int
            or reply["id"] != self.next_id
            or len(payload) != 1
            or not payload <= {"value", "raise", "stop"}
            or ("stop" in reply and (op != "next" or reply["stop"] is not True))
        ):
            self.dead = f"the candidate broke the channel protocol (bad reply to {op} #{self.next_id})"
            raise ChannelError(self.dead)
        if "raise" in reply:
            try:
                name, text = reply["raise"]
            except (TypeError, ValueError):
                self.dead = "the candidate broke the channel protocol (malformed exception)"
                raise ChannelError(self.dead) from None
            cls = _BUILTIN_EXC.get(str(name))
            raise (cls or CandidateError)(str(text) if cls else f"{name}: {text}")
        if "stop" in reply:
            raise StopIteration
        try:
            value = decode(reply["value"], lambda i, t: Remote(["ref", i], t))
        except (KeyError, ValueError, TypeError, RecursionError, OverflowError) as exc:
            self.dead = f"the candidate broke the channel protocol ({type(exc).__name__})"
            raise ChannelError(self.dead) from None
        if op == "iter" and type(value) is not Remote:
            self.dead = "the candidate broke the channel protocol (iter answered without an iterator)"
            raise ChannelError(self.dead)
        return value


_BUILTIN_EXC = {
    n: c
    for n, c in vars(__import__("builtins")).items()
    if isinstance(c, type) and issubclass(c, Exception) and n not in ("StopIteration", "StopAsyncIteration")
}
_CHANNEL: list = []  # T's one channel (a list so proxies need no global statement)


def _ref_arg(obj: object) -> list:
    if isinstance(obj, Remote):
        target = object.__getattribute__(obj, "_target")
        if target[0] == "ref":
            return ["ref", target[1], "arg"]
    raise NotPlainError(f"{type(obj).__name__} cannot be passed to the candidate: only plain data crosses")


class Remote:
    """Stand-in for a candidate object: calls, attribute calls and iteration go over the channel.

    It has no truth value, no ordering and identity equality: a test can only learn what the
    candidate returns as plain data.
    """

    __slots__ = ("_target", "_type")

    def __init__(self, target: list, type_name: str = "function") -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_type", type_name)

    def __call__(self, *args: object, **kwargs: object) -> object:
        return _CHANNEL[0].request("call", object.__getattribute__(self, "_target"), args, kwargs)

    def __getattr__(self, name: str) -> Remote:
        if name.startswith("__"):
            raise AttributeError(name)
        return Remote(["attr", object.__getattribute__(self, "_target"), name], "attribute")

    def __iter__(self):
        it = _CHANNEL[0].request("iter", object.__getattribute__(self, "_target"))
        while True:
            try:
                yield _CHANNEL[0].request("next", object.__getattribute__(it, "_target"))
            except StopIteration:
                return

    def __bool__(self) -> bool:
        raise TypeError(
            f"a candidate {object.__getattribute__(self, '_type')} object has no truth value here"
        )

    def __repr__(self) -> str:
        return f"<candidate {object.__getattribute__(self, '_type')}>"


# Modules a test may use under a name the candidate defined: T imports them itself (the real module,
# never the candidate's object). Pure computation only: nothing that reaches files, processes or
# the network beyond what T already can.
MODULE_ALLOW = frozenset(
    """math cmath decimal fractions numbers random statistics string re collections collections.abc
    itertools functools operator heapq bisect array copy json datetime calendar time typing
    dataclasses enum textwrap unicodedata difflib struct binascii base64 hashlib sys""".split()
)


def _test_namespace(names: dict, attr_bases: set[str]) -> dict:
    """T's globals: a fresh `__main__` with the real builtins, then the candidate's names, except
    builtins and dunders (a candidate `range`, `all` or `isinstance` would make the tests' own
    loops and checks lie). Candidate modules, and allowed module names the tests use as modules
    (`attr_bases`: the names the tests use as `name.attr`, found by the parent), are imported here
    from MODULE_ALLOW; other modules are left out."""
    import builtins
    import importlib

    g = _fresh_main("__main__")
    g["__builtins__"] = builtins
    reserved = set(vars(builtins))
    for name, enc in names.items():
        if type(name) is not str or not name.isidentifier() or name.startswith("__") or name in reserved:
            continue
        module = None
        if name in MODULE_ALLOW and name in attr_bases:
            module = name
        elif type(enc) is list and len(enc) == 2 and enc[0] == "module":
            module = enc[1]
            if module not in MODULE_ALLOW:
                continue
        if module is not None:
            try:
                g[name] = importlib.import_module(module)
            except ImportError:
                pass
            continue
        try:
            g[name] = Remote(["name", name]) if enc == ["callable"] else decode(enc)
        except (ValueError, TypeError, RecursionError, OverflowError):
            continue
    return g


def _child_tests(tests: list[dict], attr_bases: set[str], req_fd: int, rep_fd: int, rec_fd: int) -> None:
    """Run every test against proxies of the candidate; one record per test on rec_fd."""
    dumps, write = json.dumps, _write_all
    channel = _Channel(req_fd, rep_fd)
    _CHANNEL.append(channel)
    try:
        hello = channel.receive()
    except ChannelError as exc:
        hello = {"load_error": f"the program ended before defining its functions ({exc})"}
    if "load_error" in hello or type(hello.get("names")) is not dict:
        write(
            rec_fd,
            (dumps({"load_error": str(hello.get("load_error", "bad announcement"))[:500]}) + "\n").encode(),
        )
        return
    g = _test_namespace(hello["names"], attr_bases)
    state: dict = {"asserts": 0}

    def strict_eq(a: object, b: object) -> bool:
        try:
            ea, eb = encode(a), encode(b)
        except NotPlainError:
            ea = eb = None
        equal = ea is not None and values_equal(
            ea, eb, state["rel_tol"], state["abs_tol"], state["exact_ints"]
        )
        if ea is not None:
            size = len(dumps(ea)) + len(dumps(eb))
            if state["budget"] >= size:
                state["budget"] -= size
                state["cmps"].append([ea, eb, equal])
            else:
                state["partial"] = True
        return equal

    def strict_ne(a: object, b: object) -> bool:
        """`a != b` holds only for two plain values that differ: an object is never unequal."""
        try:
            encode(a), encode(b)
        except NotPlainError:
            return False
        return not strict_eq(a, b)

    def counted() -> None:
        state["asserts"] += 1

    g["__pt_eq__"], g["__pt_ne__"], g["__pt_assert__"] = strict_eq, strict_ne, counted
    for i, test in enumerate(tests):
        state.update(
            rel_tol=test["rel_tol"], abs_tol=test["abs_tol"], exact_ints=test.get("exact_ints", True),
            budget=CMP_BUDGET, cmps=[], partial=False, asserts=0,
        )  # fmt: skip
        rec: dict = {"i": i}
        try:
            if channel.dead:
                raise ChannelError(channel.dead)
            if test["kind"] == "value":
                state["asserts"] += 1
                rec["value"] = encode(eval(compile(test["expr"], f"<test {i}>", "eval"), g))
            else:
                exec(compile(test["src"], f"<test {i}>", "exec"), g)
                rec["ok"] = True
            if channel.dead:  # met inside the test and swallowed there (a bare `except:`)
                raise ChannelError(channel.dead)
        except BaseException as exc:  # noqa: BLE001 - a failing test, whatever it raised
            rec.pop("ok", None)
            rec.pop("value", None)
            rec["error"] = _format_exc(exc)
        rec["cmps"], rec["partial"], rec["asserts"] = state["cmps"], state["partial"], state["asserts"]
        write(rec_fd, (dumps(rec) + "\n").encode())
    write(rec_fd, b'{"done": true}\n')


# -- C in io / plain mode ----------------------------------------------------------------------


def _child_program(code: str, rec_fd: int) -> None:
    """C in io / plain mode: run the program as __main__ on the stdin R prepared."""
    g = _fresh_main("__main__")
    try:
        exec(compile(code, "<solution>", "exec"), g)
    except SystemExit as exc:
        status = exc.code
        _flush()
        os._exit(status if isinstance(status, int) and 0 <= status < 256 else (0 if status is None else 1))
    except BaseException as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        _write_all(rec_fd, (json.dumps({"error": _format_exc(exc)}) + "\n").encode())
        _flush()
        os._exit(1)


# -- R -----------------------------------------------------------------------------------------


_DEFAULT_HANDLERS: dict = {}


def _ignore_signals() -> None:
    """R ignores every catchable signal (SIGCHLD stays default so R can reap its children)."""
    for sig in signal.valid_signals():
        if sig in _UNCATCHABLE or sig == signal.SIGCHLD:
            continue
        try:
            _DEFAULT_HANDLERS[sig] = signal.signal(sig, signal.SIG_IGN)
        except (OSError, ValueError):
            pass


# What a fresh `python` sets up (SIGINT raises KeyboardInterrupt; SIGPIPE and SIGXFSZ are ignored);
# every other signal is at SIG_DFL.
_PYTHON_DEFAULTS = {
    signal.SIGINT: signal.default_int_handler,
    signal.SIGPIPE: signal.SIG_IGN,
    signal.SIGXFSZ: signal.SIG_IGN,
}


def _restore_signals() -> None:
    """The program starts with the handlers a fresh Python has, whatever R inherited: a host started
    under `nohup` ignores SIGINT, and the program must not inherit that."""
    for sig in _DEFAULT_HANDLERS:
        try:
            signal.signal(sig, _PYTHON_DEFAULTS.get(sig, signal.SIG_DFL))
        except (OSError, ValueError, TypeError):
            pass


def _set_non_dumpable() -> None:
    """PR_SET_DUMPABLE=0: other processes of the sandbox can no longer open /proc/<pid>/mem or /fd."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


class _Child:
    """A forked child with its captured pipes."""

    def __init__(self, pid: int, fds: dict[str, int], caps: dict[str, int]) -> None:
        self.pid, self.fds, self.caps = pid, fds, caps
        self.pidfd = os.pidfd_open(pid)
        self.bufs = {k: bytearray() for k in fds}
        self.over = False
        self.status = 0


def _fork(
    body, keep: tuple[int, ...], close: tuple[int, ...], stdin_text: str, rec: bool
) -> tuple[dict[str, int], int]:
    """Fork a child that runs body(rec_w) with fresh stdio pipes; `close` are fds it must not hold."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    rec_r, rec_w = os.pipe() if rec else (-1, -1)
    in_fd = os.memfd_create("stdin")
    _write_all(in_fd, stdin_text.encode())
    os.lseek(in_fd, 0, os.SEEK_SET)
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (*close, out_r, err_r, rec_r):
                if fd >= 0 and fd not in keep:
                    os.close(fd)
            os.setpgid(0, 0)
            for src, dst in ((in_fd, 0), (out_w, 1), (err_w, 2)):
                os.dup2(src, dst)
            for fd in (in_fd, out_w, err_w):
                os.close(fd)
            sys.stdin = open(0, encoding="utf-8", closefd=False)
            sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
            sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
            body(rec_w)
        finally:
            _flush()
            os._exit(0)
    for fd in (out_w, err_w, rec_w, in_fd):
        if fd >= 0:
            os.close(fd)
    fds = {"stdout": out_r, "stderr": err_r}
    if rec:
        fds["rec"] = rec_r
    return fds, pid


def _collect(children: list[_Child], main: _Child) -> None:
    """Capture every child's pipes (capped) until `main` exits; then kill the others' groups."""
    poller = select.poll()
    owner: dict[int, tuple[_Child, str]] = {}
    for ch in children:
        poller.register(ch.pidfd, select.POLLIN)
        for key, fd in ch.fds.items():
            poller.register(fd, select.POLLIN)
            owner[fd] = (ch, key)
    exited: set[int] = set()
    while main.pid not in exited:
        for fd, _ in poller.poll():
            if fd in owner:
                ch, key = owner[fd]
                chunk = os.read(fd, 65536)
                if not chunk:
                    poller.unregister(fd)
                    del owner[fd]
                    continue
                ch.bufs[key] += chunk
                if len(ch.bufs[key]) > ch.caps[key]:
                    ch.over = True
                    _kill_group(ch.pid)
                    poller.unregister(fd)
                    del owner[fd]
            else:
                ch = next(c for c in children if c.pidfd == fd)
                exited.add(ch.pid)
                poller.unregister(fd)
    for ch in children:
        if ch is not main:
            _kill_group(ch.pid)
    for fd, (ch, key) in owner.items():  # drain what was written without waiting on daemons' pipes
        os.set_blocking(fd, False)
        while len(ch.bufs[key]) <= ch.caps[key]:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            ch.bufs[key] += chunk
    for ch in children:
        _, status = os.waitpid(ch.pid, 0)
        ch.status = os.waitstatus_to_exitcode(status)
        _kill_group(ch.pid)  # leftovers that stayed in its process group
        for fd in (*ch.fds.values(), ch.pidfd):
            os.close(fd)
    _reap_orphans()


def _unit(ch: _Child, k: int) -> dict:
    out = {
        "unit": k,
        "exit": ch.status,
        "over": ch.over or any(len(b) > ch.caps[n] for n, b in ch.bufs.items()),
    }
    for key, buf in ch.bufs.items():
        out[key] = bytes(buf[: ch.caps[key]]).decode("utf-8", "replace")
    return out


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


def _read_frame() -> dict:
    """One frame of the job on stdin: 10 ascii digits of length, newline, JSON. Read unbuffered,
    so nothing of the next frame is in R's memory when it forks the candidate."""
    header = b""
    while len(header) < 11:
        chunk = os.read(0, 11 - len(header))
        if not chunk:
            raise EOFError("job truncated")
        header += chunk
    n, body = int(header[:10]), bytearray()
    while len(body) < n:
        chunk = os.read(0, min(1 << 20, n - len(body)))
        if not chunk:
            raise EOFError("job truncated")
        body += chunk
    return json.loads(body.decode("utf-8"))


def _child_body(fn, *args):
    def body(rec_w: int) -> None:
        _restore_signals()
        fn(*args, rec_w) if rec_w >= 0 else fn(*args)

    return body


def main(argv: list[str]) -> None:
    """R: ready byte, the program, [fork C, the tests, fork T], one line per unit, nonce last."""
    result_fd, nonce_fd, cap = int(argv[1]), int(argv[2]), int(argv[3])
    _ignore_signals()
    _set_non_dumpable()
    _write_all(result_fd, b"R")
    job = _read_frame()
    private = (result_fd, nonce_fd)
    small = {"stdout": cap, "stderr": cap, "rec": 1 << 16}
    if job["mode"] == "asserts":
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        fds, pid = _fork(
            _child_body(_child_candidate, job["code"], req_r, rep_w),
            (req_r, rep_w), (*private, req_w, rep_r), "", rec=False,
        )  # fmt: skip
        cand = _Child(pid, fds, small)
        os.close(req_r)
        os.close(rep_w)
        del job
        frame = _read_frame()
        tests, attr_bases = frame["tests"], {str(b) for b in frame.get("attr_bases", ())}

        def tests_body(rec_w: int) -> None:
            _set_non_dumpable()
            _child_tests(tests, attr_bases, req_w, rep_r, rec_w)

        fds, pid = _fork(tests_body, (req_w, rep_r), (*private, *cand.fds.values(), cand.pidfd), "", rec=True)
        judge = _Child(pid, fds, {"stdout": cap, "stderr": cap, "rec": max(4 << 20, 4 * cap)})
        os.close(req_w)
        os.close(rep_r)
        _collect([cand, judge], judge)
        _write_all(result_fd, (json.dumps(_unit(cand, 0)) + "\n").encode())
        _write_all(result_fd, (json.dumps(_unit(judge, 1)) + "\n").encode())
    else:
        _read_frame()
        inputs = job["inputs"] if job["mode"] == "io" else [""]
        for k, text in enumerate(inputs):
            fds, pid = _fork(_child_body(_child_program, job["code"]), (), private, text, rec=True)
            ch = _Child(pid, fds, small)
            _collect([ch], ch)
            _write_all(result_fd, (json.dumps(_unit(ch, k)) + "\n").encode())
    nonce = os.read(nonce_fd, 256).decode()
    _write_all(result_fd, (json.dumps({"end": True, "nonce": nonce}) + "\n").encode())
    os.close(result_fd)


if __name__ == "__main__":
    main(sys.argv)

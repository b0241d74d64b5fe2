"""Plain data: the only thing that crosses between the candidate, the tests and the parent.

Stdlib only: this source is also prepended to the in-sandbox runner (see slot.py), so every
side encodes, decodes and compares values with the same code.

Encoding (JSON-safe, tagged, built only from exact builtin types):
``["None"]``, ``["bool", b]``, ``["int", "digits"]``, ``["float", "repr"]``, ``["complex", "repr"]``,
``["str", s]``, ``["bytes", "hex"]``, ``["list"|"tuple"|"set"|"frozenset", [items]]``,
``["dict", [[key, value], ...]]``, and, on the candidate channel only, ``["ref", id, "type"]``
for an object that is not plain data (it stays in the candidate's process).

Comparison policy (`values_equal`), decided on encodings, never by objects a candidate made:
* numbers: int == int exactly; an int against a float (or complex) only when they are exactly
  equal, as Python compares them, so ``3.0`` answers an expected ``3`` but ``1000000008.0`` does
  not answer ``1000000007``; float against float (and complex parts) when equal or
  ``math.isclose(a, b, rel_tol, abs_tol)``. Defaults ``rel_tol=1e-9, abs_tol=0.0``; a test that
  sets its own tolerance (``exact_ints=False``) applies it to ints against floats too. NaN equals nothing.
* bool equals only bool (``True`` is not an answer for ``1``); None only None.
* str and bytes exactly; list vs tuple never (as in Python); set equals frozenset (as in Python).
* containers element-wise with the same tolerance; set elements and dict keys by their exact
  canonical form (integral floats as ints), as hashing does.
* a ``ref`` (a non-plain object) equals nothing.
"""

from __future__ import annotations

import json
import math

DEFAULT_REL_TOL = 1e-9
DEFAULT_ABS_TOL = 0.0
MAX_DEPTH = 64


class NotPlainError(TypeError):
    """A value is not built only from exact builtin types."""


def encode(value: object, ref=None, depth: int = 0) -> list:
    """Tagged encoding of `value`. `ref(obj) -> list` encodes a non-plain object (else NotPlainError)."""
    if depth > MAX_DEPTH:
        raise NotPlainError("value nested too deeply (or self-referential)")
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
    try:
        if t is list or t is tuple:
            return [t.__name__, [encode(x, None, depth + 1) for x in value]]
        if t is set or t is frozenset:
            return [t.__name__, sorted((encode(x, None, depth + 1) for x in value), key=json.dumps)]
        if t is dict:
            pairs = [[encode(k, None, depth + 1), encode(v, None, depth + 1)] for k, v in value.items()]
            return ["dict", sorted(pairs, key=json.dumps)]
    except NotPlainError:
        if ref is None:
            raise
        return ref(value)
    if ref is not None:
        return ref(value)
    raise NotPlainError(f"a value of type {t.__module__}.{t.__qualname__} is not plain data")


_SCALARS = {"int": int, "float": float, "complex": complex}


def decode(data: object, ref=None, depth: int = 0) -> object:
    """Builtin value of an encoding (ValueError if malformed). `ref(id, type)` builds a ref's stand-in."""
    if depth > MAX_DEPTH or type(data) is not list or not data or type(data[0]) is not str:
        raise ValueError(f"malformed plain-data encoding: {str(data)[:80]}")
    tag, args = data[0], data[1:]
    if tag == "None" and not args:
        return None
    if len(args) == 1 and tag == "bool" and type(args[0]) is bool:
        return args[0]
    if len(args) == 1 and tag in _SCALARS and type(args[0]) is str:
        return _SCALARS[tag](args[0])
    if len(args) == 1 and tag == "str" and type(args[0]) is str:
        return args[0]
    if len(args) == 1 and tag == "bytes" and type(args[0]) is str:
        return bytes.fromhex(args[0])
    if len(args) == 1 and tag in ("list", "tuple", "set", "frozenset") and type(args[0]) is list:
        items = [decode(x, None, depth + 1) for x in args[0]]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    if len(args) == 1 and tag == "dict" and type(args[0]) is list:
        out = {}
        for pair in args[0]:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("malformed dict encoding")
            out[decode(pair[0], None, depth + 1)] = decode(pair[1], None, depth + 1)
        return out
    if tag == "ref" and ref is not None and len(args) == 2 and type(args[0]) is int and type(args[1]) is str:
        return ref(args[0], args[1])
    raise ValueError(f"malformed plain-data encoding with tag {tag!r}")


def _canonical(data: list) -> str:
    """Exact hashing form of an encoded set element / dict key (integral floats as ints)."""
    if data and data[0] == "float":
        f = float(data[1])
        if f.is_integer():
            return json.dumps(["int", str(int(f))])
    if data and data[0] in ("tuple", "frozenset"):
        return json.dumps([data[0], [_canonical(x) for x in data[1]]])
    return json.dumps(data)


def _number(data: list) -> int | float | None:
    if data[0] == "int":
        return int(data[1])
    if data[0] == "float":
        return float(data[1])
    return None


def _close(a: float | int, b: float | int, rel_tol: float, abs_tol: float) -> bool:
    if a == b:  # exact, also for big ints against floats
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=abs_tol)
    except OverflowError:
        return False


def values_equal(
    a: object,
    b: object,
    rel_tol: float = DEFAULT_REL_TOL,
    abs_tol: float = DEFAULT_ABS_TOL,
    exact_ints: bool = True,
) -> bool:
    """Equality of two encodings under the documented tolerance policy (malformed input: False).

    exact_ints: an int against a float or complex compares exactly (no tolerance); False only
    when a test set its own tolerance."""
    try:
        return _eq(a, b, rel_tol, abs_tol, 0, exact_ints)
    except (ValueError, TypeError, IndexError, KeyError, RecursionError):
        return False


def _eq(a: list, b: list, rel_tol: float, abs_tol: float, depth: int, exact_ints: bool = True) -> bool:
    if depth > MAX_DEPTH or type(a) is not list or type(b) is not list or not a or not b:
        return False
    ta, tb = a[0], b[0]
    if "ref" in (ta, tb):
        return False
    if ta in ("int", "float") and tb in ("int", "float"):
        x, y = _number(a), _number(b)
        if ta == tb == "int" or (exact_ints and "int" in (ta, tb)):
            return x == y  # Python compares int with float exactly: an int needs an equal whole number
        return _close(x, y, rel_tol, abs_tol)
    if ta == "complex" or tb == "complex":
        if ta == "bool" or tb == "bool" or "None" in (ta, tb) or ta not in ("int", "float", "complex"):
            return False
        if tb not in ("int", "float", "complex"):
            return False
        if exact_ints and "int" in (ta, tb):
            x, y = (
                (_number(a) if ta == "int" else complex(a[1])),
                (_number(b) if tb == "int" else complex(b[1])),
            )
            return x == y
        x = complex(a[1]) if ta == "complex" else complex(_number(a))
        y = complex(b[1]) if tb == "complex" else complex(_number(b))
        return _close(x.real, y.real, rel_tol, abs_tol) and _close(x.imag, y.imag, rel_tol, abs_tol)
    set_like = ("set", "frozenset")
    if ta in set_like and tb in set_like:
        return sorted(map(_canonical, a[1])) == sorted(map(_canonical, b[1]))
    if ta != tb:
        return False
    if ta in ("None", "bool", "str", "bytes"):
        return a[1:] == b[1:]
    if ta in ("list", "tuple"):
        return len(a[1]) == len(b[1]) and all(
            _eq(x, y, rel_tol, abs_tol, depth + 1, exact_ints) for x, y in zip(a[1], b[1], strict=True)
        )
    if ta == "dict":
        da = {_canonical(k): v for k, v in a[1]}
        db = {_canonical(k): v for k, v in b[1]}
        return da.keys() == db.keys() and all(
            _eq(da[k], db[k], rel_tol, abs_tol, depth + 1, exact_ints) for k in da
        )
    return False

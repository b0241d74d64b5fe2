"""Checksum manifests that make a checkpoint directory verifiable, and durable (fsynced) writes.

``manifest.json`` lists every other file of the directory with its size and sha256. It is written
last, so its presence means every listed file was complete and fsynced before it.
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST = "manifest.json"
_CHUNK = 8 << 20  # 8 MiB reads: hashing runs at disk / sha256 speed, not per-call overhead


def fsync_file(path: str) -> None:
    """Flush one file's data to disk (a rename after this cannot expose a truncated file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (creations and renames inside it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    """Relative paths of all files under ``directory`` except the manifest, sorted."""
    out = []
    for dirpath, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), directory)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def file_entries(directory: str, names: list[str]) -> dict[str, dict[str, object]]:
    """fsync each file, then its size and sha256: the manifest entries for ``names``.

    Each rank computes the entries of the files it wrote, so hashing is spread over the ranks."""
    entries: dict[str, dict[str, object]] = {}
    for rel in names:
        path = os.path.join(directory, rel)
        fsync_file(path)
        entries[rel] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    return entries


def write_manifest(
    directory: str, meta: dict[str, object], known: dict[str, dict[str, object]] | None = None
) -> None:
    """Write ``manifest.json`` atomically and fsync it. ``known`` holds entries already computed
    (by ``file_entries``); every other file of the directory is fsynced and hashed here."""
    known = dict(known or {})
    rest = [rel for rel in _files(directory) if rel not in known]
    entries = {**known, **file_entries(directory, rest)}
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**meta, "files": dict(sorted(entries.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))
    fsync_dir(directory)


def verify_manifest(directory: str, part: tuple[int, int] = (0, 1)) -> str | None:
    """None if ``directory`` matches its manifest, else the first problem found, in words.

    ``part=(i, n)``: check the sha256 of every n-th listed file starting at i (sizes of all), so n
    ranks verify a checkpoint together, each reading 1/n of it."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return f"no {MANIFEST} (the save did not finish, or an older posttrain wrote it)"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable {MANIFEST}: {err}"
    for rel, want in files.items():
        p = os.path.join(directory, rel)
        if not os.path.isfile(p):
            return f"{rel} is missing"
        if os.path.getsize(p) != want["bytes"]:
            return f"{rel} has {os.path.getsize(p)} bytes, the manifest says {want['bytes']}"
    i, n = part
    for rel in sorted(files)[i::n]:
        if sha256_file(os.path.join(directory, rel)) != files[rel]["sha256"]:
            return f"{rel} fails its sha256 check (corrupted after it was written)"
    return None

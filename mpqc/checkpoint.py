"""Checkpoints and run directories: written atomically, verified on load, never executing code.

A checkpoint file holds ``{"format", "sha256", "payload"}`` where ``payload`` is the ``torch.save`` bytes of a
plain dict of tensors and Python scalars; it loads with ``torch.load(weights_only=True)`` twice (envelope, then
payload) so loading never runs code. Each save writes a temp file, fsyncs it, and renames it over the target;
the previous good checkpoint is kept as ``<name>.prev.pt`` and used when the newest one is corrupt.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mpqc.errors import CheckpointError

CHECKPOINT_FORMAT = "mpqc-checkpoint/1"
RUN_FORMAT = "mpqc-run/1"
log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, _torch_bytes(obj))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Save ``state`` with a checksum; the file it replaces becomes ``<stem>.prev.pt``."""
    path = Path(path)
    payload = _torch_bytes(state)
    envelope = {"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    if path.exists():
        os.replace(path, _previous(path))
    atomic_torch_save(envelope, path)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The newest good checkpoint at ``path`` (falling back to ``.prev.pt``), or None if there is none.

    Raises :class:`CheckpointError` when checkpoints exist but none of them is readable.
    """
    path = Path(path)
    errors = []
    for candidate in (path, _previous(path)):
        if not candidate.exists():
            continue
        try:
            return _read(candidate)
        except CheckpointError as error:
            errors.append(str(error))
            log.warning("%s; trying the previous checkpoint", error)
    if errors:
        raise CheckpointError("no readable checkpoint: " + "; ".join(errors))
    return None


def _previous(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def _read(path: Path) -> dict[str, Any]:
    try:
        envelope = torch.load(path, weights_only=True)
    except Exception as error:  # truncated zip, not a torch file, unsafe pickle: all unreadable
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: {error})") from error
    if not isinstance(envelope, dict) or envelope.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file")
    payload = envelope["payload"]
    if hashlib.sha256(payload).hexdigest() != envelope["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    return torch.load(io.BytesIO(payload), weights_only=True)


class RunDirectory:
    """The ``--out`` directory of one compile run: ``run.json`` (what run it is) and ``checkpoints/``.

    Opening a directory that already holds a run is refused unless ``resume`` (same run: continue it) or
    ``force`` (wipe it and start again). A directory holding a *different* run is refused even with ``resume``.
    """

    def __init__(self, path: str | Path, identity: dict[str, Any], *, resume: bool = False, force: bool = False):
        self.path = Path(path)
        self.identity = identity
        manifest = self.path / "run.json"
        if force and self.path.exists():
            shutil.rmtree(self.path)
        if manifest.exists():
            existing = json.loads(manifest.read_text())
            if existing.get("identity") != identity:
                changed = sorted(
                    key for key in set(existing.get("identity", {})) | set(identity)
                    if existing.get("identity", {}).get(key) != identity.get(key)
                )
                raise CheckpointError(
                    f"{self.path} holds a different run (differs in: {', '.join(changed)}); "
                    f"choose another --out or pass --force to overwrite it"
                )
            if not resume:
                raise CheckpointError(
                    f"{self.path} already holds this run; pass --resume to continue it or --force to start over"
                )
        elif self.path.exists() and any(self.path.iterdir()):
            if resume:
                raise CheckpointError(f"{self.path} holds no mpqc run to resume (no run.json)")
            raise CheckpointError(f"{self.path} is not empty and holds no mpqc run; choose an empty --out")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(manifest, json.dumps({"format": RUN_FORMAT, "identity": identity}, indent=1).encode())

    def checkpoint(self, phase: str) -> Path:
        return self.path / "checkpoints" / f"{phase}.pt"

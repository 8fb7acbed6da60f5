"""pnnh-train checkpoints: written atomically, checksummed, read with ``weights_only=True``.

A checkpoint file is ``torch.save`` of ``{"format": FORMAT, "kind": ..., "sha256": ..., "payload": ...}``:
``payload`` is the serialized state (a uint8 tensor of ``torch.save``'s bytes) and ``sha256`` its digest,
checked before the state is unpickled. ``kind`` is ``"resume"`` (last.pt: everything a resume needs) or
``"weights"`` (best.pt: the model and its config). Every way a file can fail to be one (missing, empty,
another format, truncated, flipped bits) raises :class:`CheckpointError` naming the path.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import pickle
import tempfile
from typing import Any

import torch

FORMAT = "pnnh-train-checkpoint/1"
KINDS = ("resume", "weights")
_TEMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A file that is not a readable pnnh-train checkpoint (the message names the path and the reason)."""


def _sync_folder(folder: str) -> None:
    """fsync a folder, so that a rename in it survives a power loss (where the OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is then as durable as they make it
    finally:
        os.close(fd)


def _write_atomic(data: bytes, path: str) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    A crash at any point leaves either the previous file or the new one, never a torn file; a full disk
    raises OSError (no space left on device) and leaves the previous file and no temporary one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # name the file the disk refused
            raise OSError(exc.errno, exc.strerror, path) from None
        raise
    _sync_folder(folder)


def write_text_atomic(text: str, path: str) -> None:
    _write_atomic(text.encode(), path)


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()  # serialized in memory first: a full disk then fails in a plain write, not inside torch
    torch.save(obj, buffer)
    return buffer.getvalue()


def non_finite_entries(obj: Any, prefix: str = "") -> list[str]:
    """The keys (dotted paths) of the floating-point tensors in ``obj`` holding NaN or infinity."""
    if isinstance(obj, torch.Tensor):
        bad = obj.is_floating_point() and not bool(torch.isfinite(obj).all())
        return [prefix or "the tensor"] if bad else []
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    return [k for key, value in items for k in non_finite_entries(value, f"{prefix}.{key}" if prefix else str(key))]


def save_checkpoint(state: dict, path: str, kind: str) -> None:
    """Write ``state`` (tensors and plain containers) as a checksummed checkpoint of ``kind``; a state holding
    a non-finite tensor is refused (FloatingPointError naming it), so a checkpoint never holds a diverged run."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    bad = non_finite_entries(state)
    if bad:
        raise FloatingPointError(f"not writing {path}: {bad[0]} holds non-finite values")
    payload = _serialize(state)
    record = {
        "format": FORMAT,
        "kind": kind,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    _write_atomic(_serialize(record), path)


def _read_record(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty: not a pnnh-train checkpoint")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(
            f"{path} is corrupted or not a pnnh-train checkpoint (it does not load: {type(exc).__name__})"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pnnh-train checkpoint (no {FORMAT!r} format record)")
    return record


def load_checkpoint(path: str, map_location: Any = "cpu", kind: str = "weights") -> dict:
    """The state saved in ``path``, its checksum verified. ``kind="resume"`` also requires a resumable
    checkpoint (last.pt), not a weights-only one (best.pt); any checkpoint serves ``kind="weights"``."""
    record = _read_record(path)
    payload = record.get("payload")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or record.get("kind") not in KINDS:
        raise CheckpointError(f"{path} is corrupted: its record lacks a payload or a kind")
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise CheckpointError(f"{path} is corrupted: its contents do not match their checksum")
    if kind == "resume" and record["kind"] != "resume":
        raise CheckpointError(
            f"{path} holds model weights only (a best.pt); resume from the run's last.pt, or start a new run"
        )
    state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is corrupted: its state lacks the model or the config")
    return state


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary files that interrupted writes left in ``folder``; returns their paths."""
    stale = sorted(glob.glob(os.path.join(folder, _TEMP_PREFIX + "*")))
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return stale

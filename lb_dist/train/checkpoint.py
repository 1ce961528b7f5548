"""Checkpoint files: written atomically, found by step, read with errors that name the file.

A checkpoint is one file ``RUN_DIR/checkpoints/step-{step:08d}.pt`` (``torch.save`` of a dict of
tensors, numbers, strings, lists and dicts, read back with ``torch.load(weights_only=True)``, so
loading a checkpoint never runs code). It is written to a temporary file in the same directory
(``.step-...pt.tmp-PID``), flushed and fsync'ed, then renamed over the final name (``os.replace``,
atomic on POSIX), and the directory is fsync'ed: a crash while writing leaves at most a temporary
file, which is ignored (and removed by the next save), never a checkpoint that loads wrong.

A backend that keeps more files for a checkpoint (DeepSpeed's per-rank ZeRO partitions) puts them in
``DIR/<backend>/step-NNNNNNNN/``, writes them before the checkpoint file (and the manifest, below,
comes last: it is the commit): files without their ``.pt`` are leftovers of a crash. They are pruned
with their file.

Integrity: after all of a checkpoint's files are written, a manifest ``step-NNNNNNNN.manifest.json``
is written last, atomically (:func:`write_manifest`): the step and, for the checkpoint file and
every file of its backend directory, the size and SHA-256. In a directory that holds manifests a
checkpoint file counts only with its manifest, and with the manifest's step equal to the name's (a
file without one is a write interrupted before its manifest, or a copy: never resumed from, never
counted by pruning). :func:`verify_checkpoint` re-hashes every file before a resume;
:func:`load_checkpoint` checks that the content's step is the name's and that the model's
floating-point tensors are finite. The run's step always comes from the verified content, never
from the file name. A directory of checkpoints written before manifests existed is read as before
(by name).

The newest complete checkpoint is the one with the highest step. A file that exists under a
checkpoint name but does not load (truncated, corrupt, not a checkpoint, checksum mismatch,
non-finite weights) is an error naming it: it is never skipped silently in favour of an older one
(delete it to fall back, the message says so).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from lb_dist._io import atomic_write, atomic_write_text

__all__ = ["CheckpointError", "FORMAT", "atomic_save", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
           "checkpoint_path", "prune_checkpoints", "clear_engine_checkpoint_dir", "manifest_path", "write_manifest", "verify_checkpoint"]

FORMAT = "lb_dist.train.checkpoint/1"
MANIFEST_FORMAT = "lb_dist.train.manifest/1"
_NAME = re.compile(r"^step-(\d{8,})\.pt$")
_MANIFEST = re.compile(r"^step-(\d{8,})\.manifest\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, truncated, another format, another run)."""


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def manifest_path(path: str | os.PathLike) -> Path:
    """The manifest of checkpoint file ``path`` (``step-N.pt`` -> ``step-N.manifest.json``)."""
    path = Path(path)
    return path.with_name(path.stem + ".manifest.json")


def _manifest_step(path: Path) -> int | None:
    """The step a manifest vouches for, or None when it is unreadable."""
    try:
        manifest = json.loads(manifest_path(path).read_text(encoding="utf-8"))
        step = manifest["step"]
        return step if isinstance(step, int) and not isinstance(step, bool) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the complete checkpoints in ``directory``, oldest first (temporaries
    ignored). Where the directory holds manifests, a checkpoint file counts only with a manifest whose
    step is the name's (see the module docstring)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found, manifests = [], False
    for entry in d.iterdir():
        m = _NAME.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry))
        elif _MANIFEST.match(entry.name):
            manifests = True
    if manifests:
        found = [(step, p) for step, p in found if _manifest_step(p) == step]
    return sorted(found)


def _files_of(path: Path) -> list[Path]:
    """The checkpoint file and every file of its backend directories (``DIR/<backend>/step-N/``)."""
    files = [path]
    for sidecar in sorted(path.parent.glob(f"*/{path.stem}")):
        if sidecar.is_dir():
            files += sorted(f for f in sidecar.rglob("*") if f.is_file())
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: str | os.PathLike, step: int) -> Path:
    """Write the manifest of checkpoint ``path`` (all its files complete): step, and size and SHA-256
    of every file; atomically, as the checkpoint's last write."""
    path = Path(path)
    files = {str(f.relative_to(path.parent)): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in _files_of(path)}
    text = json.dumps({"format": MANIFEST_FORMAT, "step": int(step), "files": files}, indent=1) + "\n"
    return atomic_write_text(manifest_path(path), text)


def _hint(path: Path) -> str:
    older = [p for _, p in list_checkpoints(path.parent) if p != path]
    return (f"; delete it to resume from the previous checkpoint {older[-1]}" if older else
            "; delete it (and the run directory's other files) to start the run over")


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Re-hash every file listed in ``path``'s manifest: :class:`CheckpointError` naming the first file
    that is missing, of another size or another SHA-256. A checkpoint without a manifest (written
    before manifests existed) passes."""
    path = Path(path)
    mpath = manifest_path(path)
    if not mpath.exists():
        return
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: its manifest {mpath} is unreadable ({e}){_hint(path)}") from e
    for rel, entry in files.items():
        f = path.parent / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {f} listed in its manifest is missing{_hint(path)}")
        size = f.stat().st_size
        problem = (f"has {size} bytes, its manifest {mpath} says {entry.get('size')} (truncated or replaced)"
                   if size != entry.get("size") else
                   f"is corrupt (its SHA-256 differs from the manifest {mpath})" if _sha256(f) != entry.get("sha256")
                   else None)
        if problem is None:
            continue
        if f == path:
            load_checkpoint(path)          # the more specific message where there is one (empty, truncated, ...)
        raise CheckpointError(f"checkpoint {path}: {f} {problem}{_hint(path)}")


def _non_finite(tree, prefix: str = "") -> str | None:
    """The key path of the first floating-point tensor with a NaN or inf in ``tree``, else None."""
    if torch.is_tensor(tree):
        if tree.is_floating_point() and tree.numel() and not bool(torch.isfinite(tree).all()):
            return prefix or "tensor"
        return None
    if isinstance(tree, float):
        return prefix if not math.isfinite(tree) else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite(v, f"{prefix}.{k}" if prefix else str(k))
        if found is not None:
            return found
    return None


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def atomic_save(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file + fsync + rename
    (:func:`lb_dist._io.atomic_write`; temporaries left by a crash of an earlier save are removed)."""
    return atomic_write(path, lambda f: torch.save(obj, f), remove_stale=True)


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """Read a checkpoint written by :func:`atomic_save`; :class:`CheckpointError` naming ``path`` if
    it is unreadable, truncated, of another format or lacks one of ``required``."""
    path = Path(path)
    hint = _hint(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from e
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes){hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and EOF errors all mean the same to the user
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}){hint}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"checkpoint {path} is not an lb_dist.train checkpoint (format {found!r}, "
                              f"expected {FORMAT!r})")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it is incomplete{hint}")
    m = _NAME.match(path.name)
    saved_step = obj.get("trainer", {}).get("step") if isinstance(obj.get("trainer"), dict) else None
    if m and saved_step is not None and int(saved_step) != int(m.group(1)):
        raise CheckpointError(f"checkpoint {path} holds step {saved_step}, not the step {int(m.group(1))} of its "
                              f"name (renamed or copied?){hint}")
    where = _non_finite(obj.get("model"))
    if where is not None:
        raise CheckpointError(f"checkpoint {path}: model tensor {where} is not finite (NaN or inf): refusing to "
                              f"resume from it{hint}")
    return obj


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (with a backend's ``DIR/<backend>/step-N/`` files)."""

    for _, p in list_checkpoints(directory)[:-keep]:
        for f in (manifest_path(p), p):           # the manifest first: never a manifest without its files
            try:
                f.unlink()
            except OSError:  # pragma: no cover
                pass
        for sidecar in Path(directory).glob(f"*/{p.stem}"):
            if sidecar.is_dir():
                shutil.rmtree(sidecar, ignore_errors=True)


def clear_engine_checkpoint_dir(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Prepare an engine's own checkpoint directory ``root`` (DeepSpeed's, DCP's) for checkpoint file
    ``path``: create it and remove the entries a crash left (the tag ``path.stem`` itself, or a tag
    without a committed checkpoint file next to ``path``). Rank 0 only, before the engine writes.
    Returns ``root``."""
    root, path = Path(root), Path(path)
    root.mkdir(parents=True, exist_ok=True)
    committed = {p.stem for _, p in list_checkpoints(path.parent)}
    for entry in root.iterdir():             # left by a crash (or pruned with their file)
        if entry.is_dir() and (entry.name == path.stem or entry.name not in committed):
            shutil.rmtree(entry, ignore_errors=True)
    return root


def engine_checkpoint_dir(backend, path: str | os.PathLike, subdir: str) -> tuple[Path, str]:
    """Where an engine writes its own part of checkpoint file ``path`` (DeepSpeed's, DCP's): the
    directory ``path.parent / subdir`` prepared by rank 0 (:func:`clear_engine_checkpoint_dir`) while
    the others wait, and the tag ``path.stem``. A collective (every rank calls it)."""
    path = Path(path)
    root = path.parent / subdir
    if backend.is_main:
        clear_engine_checkpoint_dir(root, path)
    backend.barrier()
    return root, path.stem

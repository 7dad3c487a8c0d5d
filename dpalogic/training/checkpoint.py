"""Checkpoint storage that never unpickles: tensors in safetensors files, everything else in JSON, and a manifest.

A checkpoint is a folder of *parts*. A ``.safetensors`` part holds any nested structure of dicts, lists, tuples,
numbers, strings, tensors and numpy arrays (an optimizer's state dict, RNG states): the tensors are the file's tensors
and the structure is JSON in its header, with ``{"__tensor__": key}`` where a tensor was. A ``.json`` part holds the
same without tensors. Reading either runs no code from the file.

``manifest.json`` is written last, atomically: it lists every file of the folder with its size and sha256, plus a
digest of that list. A folder without one is incomplete; :func:`verify` checks every file against it and raises
:class:`CheckpointError` naming the file and what is wrong. :func:`save` and :func:`load` are the whole interface for
one process; the training loop writes its parts from several ranks and then calls :func:`write_manifest` once.

A run's checkpoints are ``checkpoints/step-N`` with a ``latest`` file naming the newest; :func:`newest_first` lists
them (``latest`` first, resolved only inside ``checkpoints/``) and :func:`publish` moves a finished one into place and
rotates the old ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dpalogic.errors import DPALogicError

MANIFEST = "manifest.json"
FORMAT = "dpalogic-checkpoint"
VERSION = 1
LATEST = "latest"
STEP_DIR = re.compile(r"step-(\d+)")
_TREE_KEY = "dpalogic_tree"  # the safetensors header field holding a part's structure
_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__")


class CheckpointError(DPALogicError):
    """A checkpoint that is incomplete, damaged or not one; the message names the file and what is wrong."""


# --------------------------------------------------------------------------------------------------- structures


def encode(obj: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """``obj`` as JSON-able data; its tensors go into ``tensors`` under their path (``state/0/exp_avg``).

    With ``tensors=None`` a tensor is an error (a ``.json`` part). Tensors that share storage (tied weights) are
    cloned, since safetensors refuses two names for the same bytes.
    """
    return _encode(obj, tensors, "", set())


def _encode(obj: Any, tensors: dict[str, torch.Tensor] | None, path: str, seen: set[int]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise DPALogicError(f"checkpoint value {path or '(root)'} is a tensor where only JSON data can go")
        key = path or "tensor"
        if key in tensors:
            raise DPALogicError(f"checkpoint key {key!r} occurs twice")
        t = obj.detach().cpu().contiguous()
        if t.numel():
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{path}/{i}" if path else str(i), seen) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        sub = lambda k: f"{path}/{k}" if path else str(k)  # noqa: E731
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors, sub(k), seen) for k, v in obj.items()}
        # other keys (an optimizer's integer parameter ids): pairs, so the key types survive JSON
        return {"__dict__": [[_encode(k, None, path, seen), _encode(v, tensors, sub(k), seen)] for k, v in obj.items()]}
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
        if isinstance(obj, np.generic):
            return obj.item()
    raise DPALogicError(f"checkpoint value {path or '(root)'} has type {type(obj).__name__}, which is not stored")


def decode(data: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        if tensors is None or data["__tensor__"] not in tensors:
            raise CheckpointError(f"checkpoint data refers to a tensor {data['__tensor__']!r} that is not stored")
        return tensors[data["__tensor__"]]
    if "__tuple__" in data:
        return tuple(decode(v, tensors) for v in data["__tuple__"])
    if "__dict__" in data:
        return {decode(k): decode(v, tensors) for k, v in data["__dict__"]}
    if "__ndarray__" in data:
        import numpy as np

        return np.array(data["__ndarray__"], dtype=data["dtype"])
    return {k: decode(v, tensors) for k, v in data.items()}


# --------------------------------------------------------------------------------------------------- files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, flush it to disk and rename it over ``path``: never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_tensors(path: Path, obj: Any) -> None:
    """One ``.safetensors`` part: ``obj``'s tensors, its structure as JSON in the header."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = encode(obj, tensors)
    save_file(tensors, str(path), metadata={_TREE_KEY: json.dumps(tree)})
    os.chmod(
        path, _file_mode()
    )  # safetensors creates 0600 files; a checkpoint is as readable as any file the user writes
    _fsync(path)


def _file_mode() -> int:
    """The permissions ``open()`` gives a new file: 0666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def read_tensors(path: Path) -> Any:
    """Read a part written by :func:`write_tensors` (a plain safetensors file reads as its dict of tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            # copies: a tensor backed by the mapped file would change if the file were rewritten in place
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
            meta = f.metadata() or {}
        return decode(json.loads(meta[_TREE_KEY]), tensors) if _TREE_KEY in meta else tensors
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own errors: a header or data that does not parse
        raise CheckpointError(f"{path} is damaged: not a readable safetensors file ({e})") from None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(encode(obj), indent=1) + "\n")


def read_json(path: Path) -> Any:
    try:
        return decode(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is damaged: not valid JSON ({e})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _digest(files: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path) -> None:
    """List every file of ``folder`` with its size and sha256; written last, so its presence means complete."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
    }
    manifest = {"format": FORMAT, "version": VERSION, "files": files, "digest": _digest(files)}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def verify(folder: Path) -> dict[str, dict[str, Any]]:
    """Check every file of the checkpoint ``folder`` against its manifest; returns the manifest's file list.

    Raises :class:`CheckpointError` naming the file and what is wrong: missing, size or checksum differs, or no
    manifest (an interrupted save, or a checkpoint from an older dpalogic that stored pickles).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder (no such folder)")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        if (folder / "state.pt").exists():
            raise CheckpointError(
                f"{folder} is a checkpoint of an older dpalogic (a pickled state.pt), which is no longer loaded: "
                "unpickling a file can run arbitrary code. Start the run again (with --overwrite), or keep using "
                "the older version to finish it"
            )
        raise CheckpointError(
            f"{folder} is incomplete: it has no {MANIFEST} (the save was interrupted, or it is not a checkpoint)"
        )
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        ok = manifest.get("format") == FORMAT and isinstance(files, dict) and manifest.get("digest") == _digest(files)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath} is damaged: not a valid manifest ({type(e).__name__}: {e})") from None
    if not ok:
        raise CheckpointError(f"{mpath} is damaged: its contents do not match its own digest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{mpath}: checkpoint format version {manifest.get('version')} is not supported")
    for name, info in files.items():
        p = folder / name
        if not _plain_name(name) or p.is_symlink():
            raise CheckpointError(f"{mpath} lists {name!r}, which is not a plain file of the checkpoint folder")
        if not p.is_file():
            raise CheckpointError(f"{p} is missing")
        size = p.stat().st_size
        if size != info["size"]:
            raise CheckpointError(
                f"{p} is damaged: {size} bytes where {info['size']} were written"
                + (" (emptied)" if size == 0 else " (truncated)" if size < info["size"] else "")
            )
        if _sha256(p) != info["sha256"]:
            raise CheckpointError(f"{p} is damaged: its sha256 checksum differs from the one saved (corrupted bytes)")
    return files


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def save(folder: Path, parts: dict[str, Any]) -> Path:
    """Write a checkpoint: each ``name.safetensors`` / ``name.json`` part, then the manifest; the folder appears whole
    (it is written as ``folder.tmp`` and renamed). An existing ``folder`` is replaced."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, obj in parts.items():
        write_part(tmp / name, obj)
    write_manifest(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def write_part(path: Path, obj: Any) -> None:
    if path.suffix == ".safetensors":
        write_tensors(path, obj)
    elif path.suffix == ".json":
        write_json(path, obj)
    else:
        raise DPALogicError(f"checkpoint part {path.name}: the name must end in .safetensors or .json")


def read_part(path: Path) -> Any:
    return read_tensors(path) if path.suffix == ".safetensors" else read_json(path)


def load(folder: Path) -> dict[str, Any]:
    """Verify ``folder`` and read every part: ``{file name: structure}``."""
    files = verify(folder)
    return {name: read_part(Path(folder) / name) for name in files}


# --------------------------------------------------------------------------------------------------- a run's checkpoints


def step_of(path: Path) -> int | None:
    m = STEP_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def resolve_latest(root: Path) -> tuple[Path | None, str | None]:
    """The folder ``root/latest`` names, only if it is a ``step-N`` folder inside ``root``; else ``(None, why)``."""
    latest = root / LATEST
    if not latest.exists() and not latest.is_symlink():
        return None, None
    try:
        name = latest.read_text().strip() if latest.is_file() else None
    except (OSError, UnicodeDecodeError):
        name = None
    if name is None or not STEP_DIR.fullmatch(name):
        return None, f"{latest} does not name a step-N folder ({name!r}); ignored"
    target = root / name
    try:
        inside = target.resolve().parent == root.resolve()
    except OSError:
        inside = False
    if not inside:
        return None, f"{latest} names {name}, which leads outside {root}; ignored"
    return target, None


def newest_first(root: Path) -> tuple[list[Path], list[str]]:
    """The checkpoint folders of ``root``: the one ``latest`` names first, then the others by step, newest first.

    Folders that are symlinks leading outside ``root`` are left out. Returns ``(folders, notes)``.
    """
    notes: list[str] = []
    if not root.is_dir():
        return [], notes
    real_root = root.resolve()
    found = []
    for p in root.iterdir():
        step = step_of(p)
        if step is None or not p.is_dir():
            continue
        if p.resolve().parent != real_root:
            notes.append(f"{p} leads outside {root}; ignored")
            continue
        found.append((step, p))
    ordered = [p for _, p in sorted(found, key=lambda sp: -sp[0])]
    first, why = resolve_latest(root)
    if why:
        notes.append(why)
    if first is not None and first in ordered:
        ordered.remove(first)
        ordered.insert(0, first)
    return ordered, notes


def publish(tmp: Path, final: Path, keep: int) -> list[Path]:
    """Rename the written checkpoint ``tmp`` to ``final``, point ``latest`` at it and delete old checkpoints.

    Rotation keeps ``final`` and the ``keep - 1`` newest older ones; checkpoints with a higher step (left by a run
    that was resumed from an earlier step) are never deleted. Returns the deleted folders.
    """
    root = final.parent
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    step = step_of(final)
    older = sorted(
        (p for p in root.iterdir() if p.is_dir() and (s := step_of(p)) is not None and s < step), key=step_of
    )
    doomed = older[: max(0, len(older) - (keep - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed

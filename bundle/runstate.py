"""Book-keeping of a batch run's output folder: case names, locking, staging, markers, run record.

:class:`bundle.engine.MammogramInference` writes each case into a hidden staging folder
``.<case>.partial-<run id>`` beside the final one and renames it to ``<case>`` only when every
output and the completion marker ``<case>/case.json`` are written, so a killed run never leaves a
half-written case folder that looks finished, and the outputs of two runs never mix in one folder.
The marker holds the run's settings fingerprint, the weights' hashes and the input's hash: a
rerun with the same settings on the same input skips the case. ``run.json`` records the run
(settings, bundle version, weights hashes, counts); the record of an earlier run is kept under
``runs/<run id>.json``. A lock file stops two runs from writing into one folder at once, and the
leftovers of a killed run (staging folders, hidden temporary files) are removed at the next start.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import time
import types
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RunSetupError",
    "RESERVED_NAMES",
    "MARKER_NAME",
    "case_stem",
    "case_names",
    "check_output_dir",
    "output_lock",
    "clean_stale",
    "new_run_id",
    "staging_dir",
    "commit_case",
    "discard",
    "read_marker",
    "write_json_atomic",
    "honour_umask",
    "current_umask",
    "file_sha256",
    "module_sha256",
    "describe",
    "fingerprint",
]

RESERVED_NAMES = ("summary.csv", "run.json", "runs", "demo_inputs")
"""Names in the output folder that belong to the run itself; no case folder may take them."""
MARKER_NAME = "case.json"
"""Completion marker inside each finished case folder."""
LOCK_NAME = ".mcref.lock"
_PARTIAL = ".partial-"
_OLD = ".old-"
_IMAGE_ENDINGS = (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".tiff", ".tif", ".mha", ".mhd")
# hidden temporary files of the atomic writers (bundle.data, bundle.reports, bundle.dicom)
_TEMP_RE = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9.]+)?$")


class RunSetupError(ValueError):
    """The run cannot start (output or input folder unusable); the message is one line naming the folder."""


# ----------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------


def case_stem(path: str | os.PathLike) -> str:
    """File name without its image extension: ``a/case_1.nii.gz`` -> ``case_1``.

    Args:
        path: input file.
    """
    name = Path(path).name
    for ext in _IMAGE_ENDINGS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def case_names(
    files: Sequence[str | os.PathLike], output_dir: str | os.PathLike, reserved: Iterable[str] = ()
) -> dict[str, str]:
    """Give every input a case folder name that cannot collide with another input or the run's files.

    The name is the file's stem (``case_1.dcm`` -> ``case_1``). When two inputs share a stem
    (``dup.dcm`` and ``dup.png``; ``x.nii`` and ``x.nii.gz``; names equal up to case, which
    collide on case-insensitive file systems), when the stem is one of :data:`RESERVED_NAMES`
    or ``reserved`` (``summary.csv.dcm``), or when a file of that name exists in the output
    folder, the extension is kept with ``_`` for ``.`` (``dup_dcm``, ``x_nii_gz``,
    ``summary.csv_dcm``), and a counter is added if that is taken too.

    Args:
        files: the inputs, in processing order.
        output_dir: the run's output folder.
        reserved: more names to keep free (e.g. the input or demo folder's name).

    Returns:
        ``{str(file): case name}``.
    """
    out = Path(output_dir)
    taken = {n.casefold() for n in (*RESERVED_NAMES, *reserved)}

    def free(name: str) -> bool:
        if not name or name.startswith(".") or name.casefold() in taken:
            return False
        p = out / name
        return not (p.exists() or p.is_symlink()) or (p.is_dir() and not p.is_symlink())

    stems = [case_stem(f) for f in files]
    count: dict[str, int] = {}
    for s in stems:
        count[s.casefold()] = count.get(s.casefold(), 0) + 1
    names: dict[str, str] = {}
    for f, stem in zip(files, stems):
        name = stem
        if count[stem.casefold()] > 1 or not free(stem):
            ext = Path(f).name[len(stem):]
            name = f"{stem}_{ext.lstrip('.').replace('.', '_')}" if ext else stem
            name = name.lstrip(".") or "case"
        base, k = name, 1
        while not free(name):
            k += 1
            name = f"{base}_{k}"
        taken.add(name.casefold())
        names[str(f)] = name
    return names


# ----------------------------------------------------------------------------------------------
# the output folder
# ----------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder if needed and prove it writable, before any computation.

    Args:
        path: the output folder.

    Returns:
        The folder as an absolute path.

    Raises:
        RunSetupError: one line naming the folder and the problem (a file, not creatable, not writable).
    """
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise RunSetupError(f"{p}: output_dir is a file, not a folder; choose another --output_dir")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunSetupError(f"{p}: cannot create output_dir ({e.strerror or e}); choose another --output_dir") from e
    probe = p / f".mcref-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunSetupError(f"{p}: output_dir is not writable ({e.strerror or e}); choose another --output_dir") from e
    return p


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output_dir/.mcref.lock`` (POSIX ``flock``) while a run writes there.

    Args:
        output_dir: the run's output folder.

    Raises:
        RunSetupError: when another run holds the lock.
    """
    path = Path(output_dir) / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise RunSetupError(f"{output_dir}: another mcref run is writing to this output_dir; wait for it or "
                                "choose another --output_dir") from e
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def clean_stale(output_dir: Path, case_folders: Iterable[str] = ()) -> list[str]:
    """Remove what a killed run left behind; restore a case folder caught between its two renames.

    Staging folders ``.<case>.partial-*`` are removed; a ``.<case>.old-*`` folder (the previous
    outputs of a case being replaced) is renamed back to ``<case>`` when that is missing, else
    removed; hidden temporary files of the atomic writers are removed from the output folder and
    from the case folders named in ``case_folders``. Call it only while holding :func:`output_lock`.

    Args:
        output_dir: the run's output folder.
        case_folders: case folder names whose hidden temporary files may be removed.

    Returns:
        What was done, one line per item (for the log).
    """
    out = Path(output_dir)
    done: list[str] = []
    for p in sorted(out.iterdir()):
        name = p.name
        if not name.startswith("."):
            continue
        if _PARTIAL in name and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed the unfinished case folder {p}")
        elif _OLD in name and p.is_dir() and not p.is_symlink():
            final = out / name[1:].rsplit(_OLD, 1)[0]
            if not final.exists():
                os.replace(p, final)
                done.append(f"restored {final} (a replacement was interrupted)")
            else:
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed the replaced case folder {p}")
        elif _TEMP_RE.match(name) and p.is_file():
            p.unlink()
            done.append(f"removed the temporary file {p}")
    for case in case_folders:
        d = out / case
        if d.is_dir() and not d.is_symlink():
            for p in d.iterdir():
                if _TEMP_RE.match(p.name) and p.is_file():
                    p.unlink()
                    done.append(f"removed the temporary file {p}")
    return done


def new_run_id() -> str:
    """A sortable, unique run id: ``YYYYmmddTHHMMSS-xxxxxx``."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def staging_dir(output_dir: Path, case: str, run_id: str) -> Path:
    """Create the hidden staging folder of one case (replacing a leftover of the same name).

    Args:
        output_dir: the run's output folder.
        case: the case folder name.
        run_id: this run's id.
    """
    p = Path(output_dir) / f".{case}{_PARTIAL}{run_id}"
    if p.exists():
        shutil.rmtree(p)
    p.mkdir()
    return p


def commit_case(staging: Path, final: Path, run_id: str) -> None:
    """Put a finished staging folder in place of ``final`` as a whole.

    An existing ``final`` is first renamed to ``.<case>.old-<run id>`` and removed after the new
    folder is in place (:func:`clean_stale` restores it if the run dies in between).

    Args:
        staging: the complete staging folder.
        final: the case folder.
        run_id: this run's id.
    """
    old = None
    if final.exists() or final.is_symlink():
        old = final.parent / f".{final.name}{_OLD}{run_id}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def discard(path: Path | None) -> None:
    """Remove a staging folder (after a failed case); ignores a missing one.

    Args:
        path: the staging folder or None.
    """
    if path is not None and path.exists():
        shutil.rmtree(path, ignore_errors=True)


def read_marker(case_dir: Path) -> dict[str, Any] | None:
    """The completion marker of a case folder, or None when absent or unreadable.

    Args:
        case_dir: a case folder.
    """
    try:
        marker = json.loads((Path(case_dir) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def honour_umask(paths: Iterable[Path], umask: int) -> None:
    """Give files the permissions a plain ``open()`` would (``0o666 & ~umask``).

    Some writers create their temporary files with :func:`tempfile.mkstemp`, which makes them
    ``0600``; the outputs must be readable like the NIfTIs (e.g. by a PACS router or a colleague).

    Args:
        paths: files (folders are walked, their files fixed).
        umask: the process umask.
    """
    want = 0o666 & ~umask
    for p in paths:
        items = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()] if p.is_dir() else []
        for q in items:
            if q.is_symlink():
                continue
            if (q.stat().st_mode & 0o777) != want:
                os.chmod(q, want)


def write_json_atomic(obj: Any, path: Path, umask: int | None = None) -> None:
    """Write ``obj`` as indented JSON to a temporary name beside ``path``, then rename it.

    Args:
        obj: JSON-serialisable object (other values are written with ``str``).
        path: destination.
        umask: when given, the file gets ``0o666 & ~umask``.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=False, default=str, ensure_ascii=False)
            f.write("\n")
        if umask is not None:
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ----------------------------------------------------------------------------------------------
# fingerprints
# ----------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes.

    Args:
        path: the file.
        chunk: read size.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def module_sha256(module: Any) -> str:
    """SHA-256 of a torch module's state dict (names, dtypes, shapes and values), in key order.

    Args:
        module: a ``torch.nn.Module``.
    """
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        if a.numel():
            h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_SCALARS = (bool, int, float, str, type(None))


def describe(obj: Any, weights: dict[str, str] | None = None, where: str = "", depth: int = 0,
             _seen: set[int] | None = None) -> Any:
    """A JSON-friendly description of a setting: scalars as they are, objects as their class and settings.

    Torch modules are described by class and :func:`module_sha256` (collected into ``weights``
    under their attribute path); functions by name and the values their closure captured; other
    objects by their class and the description of their public attributes, to ``depth`` 5 (an
    object met again below itself is ``<Class>``); arrays and other opaque values by their type.

    Args:
        obj: what to describe.
        weights: filled with ``{attribute path: sha256}`` of every module met.
        where: attribute path of ``obj`` (for ``weights``).
        depth: current depth.
    """
    seen = set() if _seen is None else _seen
    if isinstance(obj, _SCALARS):
        return obj if not (isinstance(obj, float) and obj != obj) else "nan"
    if isinstance(obj, Path):
        return str(obj)
    try:
        import torch

        if isinstance(obj, torch.nn.Module):
            sha = module_sha256(obj)
            if weights is not None:
                weights[where or "module"] = sha
            return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", "weights_sha256": sha}
        if isinstance(obj, (torch.device, torch.dtype)):
            return str(obj)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if depth > 5 or id(obj) in seen:
        return f"<{type(obj).__name__}>"
    if isinstance(obj, Mapping):
        return {str(k): _describe_child(v, weights, f"{where}.{k}" if where else str(k), depth, seen, obj)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_describe_child(v, weights, f"{where}[{i}]", depth, seen, obj) for i, v in enumerate(obj)]
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return f"<array {obj.dtype} {tuple(obj.shape)}>"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, functools.partial):
        return {"partial": _describe_child(obj.func, weights, where, depth, seen, obj),
                "args": _describe_child(list(obj.args), weights, where, depth, seen, obj),
                "keywords": _describe_child(dict(obj.keywords), weights, where, depth, seen, obj)}
    if isinstance(obj, (types.BuiltinFunctionType, types.MethodType, type)):
        return f"<callable {getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}>"
    if isinstance(obj, types.FunctionType):  # a closure's captured values are settings too (e.g. a network)
        name = f"<callable {obj.__module__}.{obj.__qualname__}>"
        cells = dict(zip(obj.__code__.co_freevars, obj.__closure__ or ()))
        if not cells:
            return name
        inner = {}
        for k, cell in sorted(cells.items()):
            try:
                value = cell.cell_contents
            except ValueError:  # empty cell
                continue
            inner[k] = _describe_child(value, weights, f"{where}.{k}" if where else k, depth, seen, obj)
        return {"callable": name, "closure": inner}
    attrs = getattr(obj, "__dict__", None)
    cls = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if attrs is None:
        return f"<{cls}>"
    out: dict[str, Any] = {"class": cls}
    for k, v in sorted(attrs.items()):
        if k.startswith("_") or "random" in k.lower() or k in ("R",):
            continue
        out[k] = _describe_child(v, weights, f"{where}.{k}" if where else k, depth, seen, obj)
    return out


def _describe_child(value: Any, weights: dict[str, str] | None, where: str, depth: int, seen: set[int],
                    parent: Any) -> Any:
    """Describe ``value`` below ``parent``, with ``parent`` on the path (cycles end in ``<Class>``)."""
    seen.add(id(parent))
    try:
        return describe(value, weights, where, depth + 1, seen)
    finally:
        seen.discard(id(parent))


def fingerprint(settings: Any) -> str:
    """SHA-256 of the canonical JSON of ``settings``.

    Args:
        settings: a :func:`describe` result.
    """
    text = json.dumps(settings, sort_keys=True, default=str, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()

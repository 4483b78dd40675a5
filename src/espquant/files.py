"""Where espquant writes, and how: one rule for every output of every command.

Losing a user's model is the worst thing a tool can do, so three promises live here:

- an output never replaces one of the command's own inputs (model, table, data, labels, test input), not
  even with ``--force``: :func:`guard_outputs` compares resolved paths and inodes (hard links, symlinks);
- an existing output is replaced only when the user asked for it (``--force``), and the message says so;
- every write is atomic (a temporary file in the destination folder, then a rename), and files that belong
  together (a table's ``.pickle`` and ``.json``, the C++ ``.cpp`` / ``.hpp`` / model header) are written all
  or nothing by :func:`write_files`: every temporary file is complete before the first rename, and a
  failed rename puts the earlier files back.

Every failure is an :class:`~espquant.errors.OutputError` naming the path and what to do.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from espquant.errors import OptionError, OutputError

__all__ = ["guard_outputs", "same_file", "write_files", "atomic_write_bytes", "check_distinct_paths"]


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when ``a`` and ``b`` name the same file: the same resolved path, or the same inode."""
    first, second = Path(a), Path(b)
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def check_distinct_paths(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str]) -> None:
    """Refuse to write an output over the user's input model."""
    if same_file(input_path, output_path):
        raise OutputError(
            f"{output_path}: the output path is the input model itself; espquant never overwrites its input. "
            "Choose another output path (or omit it to get '<name>_optimized.onnx')."
        )


def guard_outputs(
    outputs: Iterable[str | os.PathLike[str]],
    inputs: Iterable[str | os.PathLike[str] | None],
    force: bool,
) -> None:
    """Check every output path before any work is done.

    Args:
        outputs: the files the command will write (all of them, also twins the user did not name).
        inputs: the files the command reads; ``None`` entries (options not given) are ignored.
        force: whether the user allowed replacing existing outputs (``--force``).

    Raises:
        OutputError: an output is one of the inputs (never allowed), or is an existing folder.
        OptionError: an output exists and ``force`` is not set.
    """
    sources = [Path(p) for p in inputs if p is not None]
    targets = [Path(p) for p in outputs]
    for target in targets:
        for source in sources:
            if same_file(source, target):
                raise OutputError(
                    f"{target}: this output would replace the input {source}; espquant never writes over its own "
                    "inputs (not even with --force). Choose another output path."
                )
        if target.is_dir():
            raise OutputError(f"{target}: is a folder; give the path of a file to write.")
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        names = ", ".join(str(t) for t in existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise OptionError(f"{names} already exist{'s' if len(existing) == 1 else ''}; add --force to replace.")


def _folder_of(target: Path) -> Path:
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{target}: the folder {folder} does not exist; create it or choose another output path.")
    return folder


def _write_temporary(target: Path, data: bytes) -> str:
    """A complete, synced temporary file beside ``target`` holding ``data``; returns its path."""
    folder = _folder_of(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write into {folder} ({exc.strerror or exc}).") from exc
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{target}: writing failed ({exc.strerror or exc}); nothing was changed.") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_files(files: Mapping[str | os.PathLike[str], bytes]) -> list[Path]:
    """Write every file of ``files`` (path -> bytes), all or nothing; returns the paths in order.

    First every file is written to a temporary file beside its target (a full disk or a file-size limit
    fails here, before any target changes); then each is renamed over its target. If a rename fails, the
    targets already replaced get their previous contents back (kept as hard links until the end).
    """
    targets = [Path(p) for p in files]
    if len({t.resolve() for t in targets}) != len(targets):
        raise OutputError(f"two outputs share one path: {', '.join(map(str, targets))}.")
    temporaries: list[str] = []
    try:
        for target, data in zip(targets, files.values()):
            temporaries.append(_write_temporary(target, data))
    except BaseException:
        for tmp in temporaries:
            Path(tmp).unlink(missing_ok=True)
        raise
    replaced: dict[Path, tuple[bool, Path | None]] = {}  # target -> (existed before, hard link to its old file)
    pending: Path | None = None
    try:
        for target, tmp in zip(targets, temporaries):
            existed, pending = target.exists(), _backup(target) if len(targets) > 1 else None
            os.replace(tmp, target)
            replaced[target], pending = (existed, pending), None
    except BaseException as exc:
        if pending is not None:
            pending.unlink(missing_ok=True)
        _restore(replaced, temporaries)
        if isinstance(exc, OSError):
            raise OutputError(f"{target}: writing failed ({exc.strerror or exc}); nothing was changed.") from exc
        raise
    for _, backup in replaced.values():
        if backup is not None:
            backup.unlink(missing_ok=True)
    return targets


def _backup(target: Path) -> Path | None:
    """A hard link to the current ``target`` (None when there is none), so a failed group can be undone."""
    if not target.exists():
        return None
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
    os.close(fd)
    backup = Path(name)
    backup.unlink()
    try:
        os.link(target, backup)
    except OSError:
        return None  # no hard links on this file system: the group can still not be half-written by a full disk
    return backup


def _restore(backups: dict[Path, tuple[bool, Path | None]], temporaries: list[str]) -> None:
    """Undo a half-done group: earlier contents back where they were kept, new files removed."""
    for target, (existed, backup) in backups.items():
        try:
            if backup is not None:
                os.replace(backup, target)
            elif not existed:
                target.unlink(missing_ok=True)
        except OSError:
            pass
    for tmp in temporaries:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    write_files({path: data})

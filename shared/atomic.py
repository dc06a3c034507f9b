"""Atomic writes: build next to the target, then rename, so a crash never leaves a half-written result."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from shared.errors import AlreadyExists, InvalidArgument

TMP_MARK = ".tmp-"
OUTPUT_MARKER = ".megastack-output"  # in every folder atomic_dir writes: only such a folder may be replaced


def check_target(
    target: Path,
    *,
    inputs: Iterable[Path] = (),
    overwrite: bool = False,
    field: str = "save_dir",
    owned: bool = False,
) -> Path:
    """The resolved ``target`` of a job, or an error before anything is read or written.

    Refused: a target that equals, contains or is inside an input (symlinks and ``..`` resolved first); a
    file; a filesystem root or the home directory; an existing folder unless ``overwrite``, and then only
    one that megastack wrote (it holds ``.megastack-output``), so an overwrite never deletes a user's files;
    ``owned=True`` lifts that last rule for a folder the caller owns (the repository's default model).
    """
    t = _checked_place(target, inputs, field)
    if t.exists():
        if not overwrite:
            raise AlreadyExists(f"{t} already exists (pass --overwrite to replace it)", field=field)
        if not owned and not is_megastack_output(t):
            raise InvalidArgument(
                f"{field} {t} exists and was not written by megastack (no {OUTPUT_MARKER} in it): "
                "--overwrite replaces "
                "only megastack's own outputs; move it away or name a new folder",
                field=field,
            )
    return t


def _checked_place(target: Path, inputs: Iterable[Path], field: str) -> Path:
    """``target`` resolved (symlinks, ``..``, ``~``), refused when it overlaps an input, is a root, home or a
    file."""
    t = Path(target).expanduser().resolve()
    for given in inputs:
        i = Path(given).expanduser().resolve()
        if t == i or t in i.parents or i in t.parents:
            what = (
                "the same folder as" if t == i else "inside" if i in t.parents else "a folder that contains"
            )
            raise InvalidArgument(
                f"{field} {t} is {what} the input {i}: a job never writes over its inputs", field=field
            )
    if t.parent == t or t == Path.home().resolve():
        raise InvalidArgument(
            f"{field} {t} is a filesystem root or the home directory; name a new folder", field=field
        )
    if t.exists() and not t.is_dir():
        raise InvalidArgument(f"{field} {t} is a file, not a folder", field=field)
    return t


def is_megastack_output(folder: Path) -> bool:
    """Whether ``folder`` carries megastack's output marker (megastack wrote it)."""
    return (Path(folder) / OUTPUT_MARKER).is_file()


def mark_output(folder: Path) -> None:
    """Say that megastack wrote ``folder`` (so it may later replace or clean it)."""
    marker = Path(folder) / OUTPUT_MARKER
    if not marker.is_file():
        marker.write_text('{"written_by": "megastack"}\n')


def check_output_folder(
    target: Path,
    *,
    inputs: Iterable[Path] = (),
    field: str = "save_dir",
    owned: Callable[[Path], bool] | None = None,
) -> Path:
    """A folder a job writes into and comes back to (a training ``save_dir``, the demo's folders), resolved.

    Refused like :func:`check_target` (overlap with an input, a root, home, a file), and when it exists, holds
    anything, and is not megastack's (no ``.megastack-output``, and ``owned`` does not vouch for it): the job
    would mix its files with, or clean up, files that are not its own.
    """
    t = _checked_place(target, inputs, field)
    if t.is_dir() and any(t.iterdir()) and not is_megastack_output(t) and not (owned and owned(t)):
        raise InvalidArgument(
            f"{field} {t} already holds files that megastack did not write (no {OUTPUT_MARKER} in it); name "
            "a new or "
            "empty folder",
            field=field,
        )
    return t


def reset_output_folder(
    target: Path,
    *,
    inputs: Iterable[Path] = (),
    field: str = "work_dir",
    owned: Callable[[Path], bool] | None = None,
) -> Path:
    """Empty (or create) a folder megastack owns, after :func:`check_output_folder`; it is marked as
    megastack's."""
    t = check_output_folder(target, inputs=inputs, field=field, owned=owned)
    if t.exists():
        shutil.rmtree(t)
    t.mkdir(parents=True)
    mark_output(t)
    return t


@contextlib.contextmanager
def atomic_dir(
    target: Path, *, overwrite: bool = False, inputs: Iterable[Path] = (), owned: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    ``target`` is checked first (:func:`check_target`). The result holds ``.megastack-output``. On any
    exception (or KeyboardInterrupt) the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target).absolute()
    check_target(target, inputs=inputs, overwrite=overwrite, owned=owned)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any new folder
    try:
        yield tmp
        mark_output(tmp)
        _fsync_dir(tmp)
        if target.exists():
            old = target.with_name(f"{TMP_MARK}{target.name}-old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: Path, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``target``; it becomes ``target`` only when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_MARK}{target.name}-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(target: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``target``, fsync, then rename over it."""
    with atomic_file(target, "w") as f:
        f.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

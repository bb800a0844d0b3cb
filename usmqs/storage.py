"""Writing files that must not half-exist: clear errors when a disk fills, atomic replaces.

A full disk shows up in many shapes: ``OSError(ENOSPC)`` from Python, ``EDQUOT`` on a
quota'd home, and from tensorstore (Orbax's array writer) a ``ValueError`` whose message
says ``RESOURCE_EXHAUSTED`` / ``No space left on device``, often wrapped in further
exceptions raised from Orbax's threads. `is_out_of_space` recognizes all of them, and
`writing(path, what)` turns any of them into one `WriteError` that names the file, what
was being written, and the space left on that filesystem, instead of pages of tracebacks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
from collections.abc import Iterator

_OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_OUT_OF_SPACE_TEXT = (
    "no space left on device", "disk quota exceeded", "resource_exhausted",
    # tensorstore's os error codes: ENOSPC, EDQUOT (Linux)
    "os_error_code='28'", "os_error_code='122'",
)


class WriteError(OSError):
    """A file could not be written (disk full, quota, read-only, I/O error); the message
    names the path and the free space, `path` and `free_bytes` carry them."""

    def __init__(self, message: str, *, path: pathlib.Path, free_bytes: int | None):
        super().__init__(message)
        self.path, self.free_bytes = path, free_bytes


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        for inner in getattr(exc, "exceptions", ()):  # ExceptionGroup
            yield from _chain(inner)
        exc = exc.__cause__ or exc.__context__


def is_out_of_space(exc: BaseException) -> bool:
    """True if `exc` or anything it was raised from says the disk or quota is full."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _OUT_OF_SPACE_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _OUT_OF_SPACE_TEXT):
            return True
    return False


def free_space(path: str | os.PathLike) -> tuple[int, int] | None:
    """(free, total) bytes of the filesystem holding `path` (or its nearest existing
    parent); None if not even the root can be asked."""
    p = pathlib.Path(path).absolute()
    for candidate in (p, *p.parents):
        try:
            usage = shutil.disk_usage(candidate)
        except OSError:
            continue
        return usage.free, usage.total
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def describe(path: str | os.PathLike, what: str, exc: BaseException) -> WriteError:
    """The `WriteError` for `exc`, raised while writing `what` to `path`."""
    path = pathlib.Path(path)
    space = free_space(path)
    free = None if space is None else space[0]
    where = "" if space is None else f" ({_mib(space[0])} free of {_mib(space[1])} on that filesystem)"
    if is_out_of_space(exc):
        reason = "no space left on device"
    else:
        first = next((e for e in _chain(exc) if isinstance(e, OSError)), exc)
        reason = getattr(first, "strerror", None) or f"{type(first).__name__}: {first}"
    return WriteError(f"cannot write {what} to {path}: {reason}{where}", path=path, free_bytes=free)


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Raise a `WriteError` naming `path` and `what` for any OSError or out-of-space error
    inside the block (the original stays attached as ``__cause__``)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        if isinstance(e, OSError) or is_out_of_space(e):
            raise describe(path, what, e) from e
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, what: str) -> pathlib.Path:
    """Write `data` to `path` through a temporary sibling and `os.replace`: readers see the
    old file or the new one, never half of one, and a failed write leaves no temporary
    behind. Errors as `writing`."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with writing(path, what):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str, what: str) -> pathlib.Path:
    """`write_bytes_atomic` of `text` in UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"), what)

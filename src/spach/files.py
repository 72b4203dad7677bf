"""Files that survive crashes and share nicely: atomic writes, append-only logs, tolerant readers and
folder locks. Every file spach writes goes through here.

- `atomic_write_*`: a temp file in the same folder, fsync'ed, renamed over the target; a reader (or a
  resumed run) sees the old file or the new one, never half. The file gets the usual permissions
  (0666 minus the umask), not `mkstemp`'s private 0600.
- `append_jsonl`: one `write()` of one complete line with `O_APPEND`: earlier lines are never
  rewritten; a line torn by a crash is closed off before the next append.
- `read_jsonl` / `read_json`: a torn, corrupt or non-UTF-8 line (or file) is skipped and named on
  stderr, never a crash.
- `atomic_save_safetensors` / `read_safetensors`: weights as safetensors (tensors and a JSON
  metadata header only: reading one never runs code); `is_safetensors` tells the format by content.
- `FolderLock`: one process owns a run or study folder at a time (an exclusive `flock` on
  `<folder>/.lock`, released by the kernel when the process dies, so a lock left by a killed process
  is taken over safely); the loser gets a one-line error naming the holder.
- `scratch_folder`: a private, locked folder beside a file being made (an export, a download), removed
  when done; those that killed processes left (nobody holds their lock) are removed by the next one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from spach.errors import SpachError

LOCK_FILE = ".lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def os_error(e: OSError, path: str | os.PathLike, doing: str = "write") -> SpachError:
    """A user-facing one-line error for a failed file operation (full disk, no permission, ...)."""
    blocker = _file_above(path) if e.errno == errno.ENOTDIR else None
    if blocker is not None:
        return SpachError(f"cannot {doing} {path}: {blocker} is a file, not a folder; choose another path")
    if e.errno == errno.ENOSPC:
        return SpachError(f"no space left on the device to {doing} {path}; free some space and rerun "
                          "(files written before are intact)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SpachError(f"cannot {doing} {path}: {e.strerror.lower()}; choose a folder you can write to")
    return SpachError(f"cannot {doing} {path}: {e.strerror or e}")


def _file_above(path: str | os.PathLike) -> Path | None:
    """The nearest existing folder above `path` when it is not a folder (a file or a broken link: nothing
    can be created under it), else None."""
    parent = next((p for p in Path(path).absolute().parents if p.exists() or p.is_symlink()), None)
    return parent if parent is not None and not parent.is_dir() else None


def check_writable(path: str | os.PathLike, flag: str, kind: str = "file", fix: str = "") -> Path:
    """Refuse, in one line naming `flag` and before any work is done, an output path (`kind`: a "file" or
    a "folder" to write) that cannot be written: under a file, a folder where a file goes or a file
    where a folder goes, or in a folder this user may not write to. `fix`: what to do instead
    (default: choose another `flag`)."""
    path = Path(path)
    fix = fix or f"choose another {flag}"
    blocker = _file_above(path)
    if blocker is not None:
        raise SpachError(f"{flag} {path}: {blocker} is a file, not a folder; {fix}")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise SpachError(f"{flag} {path} is a file, not a folder; {fix}")
    if kind == "file" and path.is_dir():
        raise SpachError(f"{flag} {path} is a folder; pass the path of the file to write")
    where = path if path.is_dir() else next(p for p in path.absolute().parents if p.exists())
    if not os.access(where, os.W_OK | os.X_OK):
        raise SpachError(f"{flag} {path}: cannot write in {where} (permission denied); choose a folder you can write to")
    return path


def make_dirs(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SpachError(f"{folder} is a file, not a folder; choose another output folder") from None
    except OSError as e:
        raise os_error(e, folder, "create the folder") from None
    return folder


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename + fsync of the folder)."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise os_error(e, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise os_error(e, path) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, atomically: an interrupted save leaves the previous file intact."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `tensors` as a safetensors file, atomically; `metadata` values are stored as JSON text
    (safetensors metadata is str -> str) beside `format: pt`, the key other tools look for."""
    try:  # optional dependency (spach[safetensors]; timm installs it too): imported only when used
        from safetensors.torch import save
    except ImportError:
        raise SpachError("saving safetensors needs the safetensors package: pip install 'spach[safetensors]'") from None
    # own contiguous copies: safetensors refuses tensors sharing memory (a shared spatial mixer's weights)
    own = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    header = {"format": "pt", **{k: json.dumps(v) for k, v in metadata.items()}}
    atomic_write_bytes(path, save(own, header))


def safetensors_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata of a safetensors file (JSON values decoded, others kept as text), or None when
    `path` is not one. Tells the format by content (an 8-byte little-endian length, then a JSON
    header), whatever the file is called, and reads only the header."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= min(os.fstat(f.fileno()).st_size - 8, 100_000_000):
                return None
            header = json.loads(f.read(size).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    metadata: dict[str, Any] = {}
    for key, value in (header.get("__metadata__") or {}).items():
        try:
            metadata[key] = json.loads(value)
        except (TypeError, ValueError):
            metadata[key] = value
    return metadata


def is_safetensors(path: str | os.PathLike) -> bool:
    return safetensors_metadata(path) is not None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the metadata (as `safetensors_metadata`) of a safetensors file."""
    metadata = safetensors_metadata(path)
    if metadata is None:
        raise SpachError(f"{path} is not a safetensors file (its header is missing or corrupt)")
    try:  # optional dependency (spach[safetensors]; timm installs it too): imported only when used
        from safetensors.torch import load_file
    except ImportError:
        raise SpachError("reading safetensors needs the safetensors package: pip install 'spach[safetensors]'") from None
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise SpachError(f"cannot read {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return tensors, metadata


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line; earlier lines are never rewritten. A torn last line left by a crash is
    closed with a newline first, so it stays one (skipped) line instead of spoiling this one."""
    path = Path(path)
    make_dirs(path.parent)
    line = (json.dumps(record) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise os_error(e, path) from None


_WARNED: set[tuple[str, int]] = set()


def warn_once(path: str | os.PathLike, what: str) -> None:
    """Say once per process, on stderr, that part of a file was ignored and why (`what`)."""
    key = (f"{path}: {what}", -1)
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"spach: {path}: {what}", file=sys.stderr, flush=True)


def _warn(path: Path, line: int, reason: str) -> None:
    """Say once per process which line (0: the whole file) of `path` was skipped, and why."""
    key = (str(path), line)
    if key not in _WARNED:
        _WARNED.add(key)
        what = f"skipped line {line} of {path}" if line else f"ignored {path}"
        print(f"spach: {what}: {reason}", file=sys.stderr, flush=True)


def read_jsonl(path: str | os.PathLike, live: bool = False) -> list[dict[str, Any]]:
    """Every complete, valid JSON-object line of `path` (JSON's own values only: no NaN or Infinity).
    A bad line is skipped and named on stderr; so is a last line without its newline (torn by a crash),
    unless the file is `live` (being appended to as we read: that line is a write in progress)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # a path under a file does not exist either
        return []
    except OSError as e:
        raise os_error(e, path, "read") from None
    lines = raw.split(b"\n")
    if lines[-1].strip() and not live:
        _warn(path, len(lines), f"a torn last line ({len(lines[-1])} bytes without a newline), left out")
    records = []
    for i, line in enumerate(lines[:-1], start=1):  # lines[-1] is b"" or an unfinished line
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            _warn(path, i, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        records.append(rec)
    return records


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def read_json(path: str | os.PathLike, warn: bool = True) -> Any | None:
    """The JSON value in `path`; None when the file is missing, or corrupt (then named on stderr,
    unless `warn` is off because the caller says so itself)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # a path under a file does not exist either
        return None
    except (IsADirectoryError, UnicodeDecodeError, ValueError) as e:
        if warn:
            _warn(path, 0, "it is a folder" if isinstance(e, IsADirectoryError) else f"not valid JSON ({type(e).__name__})")
        return None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file a user gave us, or a one-line error naming the problem."""
    path = Path(path)
    if path.is_dir():
        raise SpachError(f"{what} {path} is a folder; pass the path of a file")
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SpachError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise SpachError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise os_error(e, path, "read") from None


class FolderLock:
    """`with FolderLock(folder, "study folder"):` - this process owns `folder` until the block ends.

    The lock is an exclusive `flock` on `<folder>/.lock`: the kernel releases it when the process
    exits or is killed, so a stale lock never blocks anybody. The file records the holder (PID, host,
    start time) for the error message of whoever comes second."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder"):
        self.folder, self.what = Path(folder), what
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> "FolderLock":
        self.created = not self.folder.exists()
        make_dirs(self.folder)
        path = self.folder / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise os_error(e, path, "lock") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise SpachError(f"{self.what} {self.folder} is in use by {holder}; wait for it to finish "
                                     "(or stop it), or choose another folder") from None
                raise os_error(e, path, "lock") from None
            try:  # the holder we waited for may have removed the file: then lock the new one
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"spach PID {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Unlock; a folder this lock created and nothing else wrote to is removed again."""
        if self.fd is None:
            return
        path = self.folder / LOCK_FILE
        if self.created and [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.folder.rmdir()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_if_abandoned(folder: Path) -> bool:
    """Remove a scratch folder whose process is gone (its lock is free); True when removed."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    try:
        FolderLock(folder, "scratch folder").acquire().release()
    except SpachError:  # held by a running process, or not ours to touch
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


@contextlib.contextmanager
def scratch_folder(beside: str | os.PathLike, prefix: str, what: str) -> Iterator[Path]:
    """A private, locked folder `<prefix><pid>-<random>` beside `beside` (the same file system, so what
    is made there moves into place atomically), removed when the block ends. Folders of this prefix
    that killed processes left there (nobody holds their lock) are removed first."""
    parent = make_dirs(Path(beside).absolute().parent)
    for old in parent.glob(f"{prefix}*"):
        remove_if_abandoned(old)
    lock = FolderLock(parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}", what).acquire()
    try:
        yield lock.folder
    finally:
        lock.release()
        shutil.rmtree(lock.folder, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

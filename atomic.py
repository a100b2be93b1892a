"""Atomic file writes: a file is replaced whole or not at all, whatever kills the writer.

Every file this project writes that a later run reads (checkpoints, metrics, prepared data, tokenizers,
reports) goes through atomic_write: written to a temporary file in the same folder, flushed to disk,
then renamed over the target. Its own module, below everything that writes, so that the model's file
formats (checkpoint.py, hf.py, tokenizer.py) can all use it without importing each other.
"""
import errno
import os
import tempfile

import torch


def atomic_write(path, write):
    """write(file) into a temporary file in the same folder, then rename over path."""
    # a crash (even kill -9) at any moment leaves either the old file or the new one, never a torn one;
    # the same folder, because a rename is atomic only within one file system
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())   # on disk before the rename, or a power cut could keep a renamed empty file
        os.chmod(tmp, 0o666 & ~current_umask())   # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)   # atomic on POSIX and Windows, even over an existing file
    except (OSError, RuntimeError) as e:   # a full disk: cli.main prints "cannot use PATH: ..." and exits 1
        error = disk_error(e, tmp, path)
        os.unlink(tmp)
        raise error from None
    except BaseException:   # KeyboardInterrupt too: never leave a .tmp- file behind on purpose
        os.unlink(tmp)
        raise


def disk_error(e, tmp, path):
    """The OSError, naming path, behind a failed write (an OSError or RuntimeError); else e itself."""
    if not isinstance(e, (OSError, RuntimeError)):
        return e   # a bug, not the disk: it keeps its traceback
    # torch.save on a full disk raises RuntimeError("... unexpected pos ..."), with the OSError that
    # caused it only as its __context__; an OSError from flush or fsync names no file
    cause = e if isinstance(e, OSError) else e.__context__
    if isinstance(cause, OSError) and cause.errno:
        return OSError(cause.errno, cause.strerror, path)
    if isinstance(e, OSError):
        return e
    # no OSError to go by: a disk with no block left (the temporary file still holds them) is full
    if hasattr(os, "statvfs") and os.statvfs(os.path.dirname(tmp)).f_bavail == 0:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return e   # a RuntimeError with no disk behind it (an object that cannot be pickled): a bug, traceback kept


def current_umask():
    # the only way to read the umask is to set it: set it, then straight back
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode()))

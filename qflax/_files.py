"""Writing files whole or not at all (imports nothing from qflax)."""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from typing import Mapping


def write_atomically(path, data: bytes | str, *, sync: bool = False) -> int:
  """Writes ``data`` (``str`` as UTF-8) to ``path`` through a temporary file in the same folder
  and ``os.replace``: a reader, or a crash, sees the old file or the new one, never a part of
  either. ``sync`` flushes it to the disk first. Returns the bytes written.

  Example:
    >>> write_atomically("runs/x/manifest.json", json.dumps(manifest))
  """
  return write_together({path: data}, sync=sync)[0]


def write_together(contents: Mapping, *, sync: bool = False) -> list[int]:
  """:func:`write_atomically` for several files: every one is written in full before any
  replaces its old version, so a failed write (a full disk) leaves all the old ones.

  A new file gets the permissions ``open`` would give it (the umask applies), a replaced one
  keeps its own; a symbolic link to a regular file is written through, and an error names
  the file, not the temporary one.
  """
  staged = []
  try:
    for path, data in contents.items():
      path = _target(path)
      payload = data.encode("utf-8") if isinstance(data, str) else data
      tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
      staged.append((tmp, path, len(payload)))
      try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
          f.write(payload)
          if sync:
            f.flush()
            os.fsync(f.fileno())
        if os.path.isfile(path):
          os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
      except OSError as e:
        e.filename = path
        raise
    for tmp, path, _ in staged:
      os.replace(tmp, path)
  except BaseException:
    for tmp, _, _ in staged:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
    raise
  return [size for _, _, size in staged]


def _target(path) -> str:
  """The absolute file to replace: a link's target where that is a regular file (so the link
  stays), else ``path`` itself (a link to a device is replaced, never the device)."""
  path = os.path.abspath(os.fsdecode(path))
  return os.path.realpath(path) if os.path.islink(path) and os.path.isfile(path) else path

"""Writing a file whole or not at all (imports nothing from qflax)."""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomically(path, data: bytes | str, *, sync: bool = False) -> int:
  """Writes ``data`` (``str`` as UTF-8) to ``path`` through a temporary file in the same folder
  and ``os.replace``: a reader, or a crash, sees the old file or the new one, never a part of
  either. ``sync`` flushes it to the disk first. Returns the bytes written.

  Example:
    >>> write_atomically("runs/x/manifest.json", json.dumps(manifest))
  """
  path = os.fspath(path)
  payload = data.encode("utf-8") if isinstance(data, str) else data
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                             dir=os.path.dirname(os.path.abspath(path)))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
      if sync:
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)      # mkstemp's 0600 would hide the file from the other users of a shared run
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  return len(payload)

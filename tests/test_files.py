"""``qflax._files``: whole-file writes."""

from __future__ import annotations

import os
import stat

import pytest

from qflax import _files


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_follows_the_umask_and_a_replaced_one_keeps_its_mode(tmp_path):
  """Reported: every file came out 0644, whatever the umask (a shared run lost group write)."""
  old = os.umask(0o002)
  try:
    _files.write_atomically(tmp_path / "new.json", "{}")
    assert _mode(tmp_path / "new.json") == 0o664
    (tmp_path / "kept.json").write_text("old")
    os.chmod(tmp_path / "kept.json", 0o600)
    _files.write_atomically(tmp_path / "kept.json", b"new")
    assert _mode(tmp_path / "kept.json") == 0o600 and (tmp_path / "kept.json").read_text() == "new"
  finally:
    os.umask(old)


def test_a_link_to_a_file_is_written_through_and_kept(tmp_path):
  (tmp_path / "target.md").write_text("old")
  (tmp_path / "link.md").symlink_to(tmp_path / "target.md")
  _files.write_atomically(os.fsencode(tmp_path / "link.md"), "new")      # a bytes path too
  assert (tmp_path / "link.md").is_symlink() and (tmp_path / "target.md").read_text() == "new"


def test_a_failed_write_keeps_every_old_file_and_names_its_own(tmp_path, monkeypatch):
  """Reported: with two files, a failure writing the second left the first already replaced, and
  the error named the temporary file."""
  for name in ("a.svg", "b.md"):
    (tmp_path / name).write_text(f"old {name}")
  real_open = os.open

  def full_disk_for_b(path, *args):
    if "b.md" in os.fspath(path):
      raise OSError(28, "No space left on device", path)
    return real_open(path, *args)
  monkeypatch.setattr(_files.os, "open", full_disk_for_b)
  with pytest.raises(OSError, match="No space left") as error:
    _files.write_together({tmp_path / "a.svg": "new", tmp_path / "b.md": "new"})
  assert error.value.filename == str(tmp_path / "b.md")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svg", "b.md"]     # no temporary file left
  assert [(tmp_path / n).read_text() for n in ("a.svg", "b.md")] == ["old a.svg", "old b.md"]

"""The library tour example runs and learns at every bit-width."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_library_tour_learns_at_every_bit_width():
  out = subprocess.run([sys.executable, str(ROOT / "examples" / "library_tour.py")], capture_output=True,
                       text=True, check=True, timeout=600, cwd=ROOT).stdout
  accuracies = dict(re.findall(r"(w\d+a\d+): test accuracy ([0-9.]+)", out))
  assert set(accuracies) == {"w32a32", "w8a8", "w4a4", "w2a2"}
  assert all(float(a) > 0.9 for a in accuracies.values()), out

"""The integer-model file: round trip, sharing, packing, and rejection of damaged or forged files."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import tracemalloc

import numpy as np
import pytest
from export_nets import build

from qflax import export

CASE = "convnet-sat-pact-fp"
HEADER = struct.Struct("<8sIQQ")


def _parts(data: bytes) -> tuple[dict, bytes]:
  _, _, m_len, p_len = HEADER.unpack_from(data)
  manifest = json.loads(data[HEADER.size:HEADER.size + m_len])
  return manifest, data[HEADER.size + m_len:HEADER.size + m_len + p_len]


def _forge(manifest, payload: bytes) -> bytes:
  """A container around ``manifest`` (a dict, or raw bytes) with correct lengths and checksum."""
  if not isinstance(manifest, bytes):   # json writes inf as Infinity, which no JSON reader takes: 1e999 parses to inf
    manifest = json.dumps(manifest, separators=(",", ":")).replace("Infinity", "1e999").encode()
  text = manifest
  body = HEADER.pack(b"QFLAXINT", 1, len(text), len(payload)) + text + payload
  return body + hashlib.sha256(body).digest()


def _expect_error(data: bytes, field: str = "") -> str:
  with pytest.raises(export.ExportFileError) as info:
    export.from_bytes(data)
  message = str(info.value)
  assert "\n" not in message and field in message, message
  return message


def test_save_load_round_trip(tmp_path):
  _, _, _, im = build(CASE)
  path = tmp_path / "convnet.qfx"
  written = export.save(path, im)
  assert written == os.path.getsize(path) == len(export.to_bytes(im))
  assert os.listdir(tmp_path) == ["convnet.qfx"]          # no temporary file left
  loaded = export.load(path)
  assert export.to_bytes(loaded) == export.to_bytes(im)
  assert list(loaded.variants) == list(im.variants)
  assert list(loaded.variants["w4a4"].layers) == list(im.variants["w4a4"].layers)   # call order


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
  _, _, _, im = build(CASE)
  path = tmp_path / "model.qfx"
  path.write_bytes(b"old")
  monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
  with pytest.raises(OSError):
    export.save(path, im)
  assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.qfx"]


def test_variants_share_float_arrays_and_low_bits_pack():
  _, _, _, im = build(CASE)
  single = {v: len(export.to_bytes(im._replace(variants={v: im.variants[v]},
                                               tensors=_used(im, v)))) for v in im.variants}
  assert single["w2a2"] < single["w4a4"] < single["w8a8"] < single["w32a32"]
  assert len(export.to_bytes(im)) < sum(single.values())   # the fp stem, classifier shared
  stem = {im.variants[v].layers["stem_conv"].kernel for v in im.variants}
  assert len(stem) == 1
  layer = im.variants["w2a2"].layers["blocks_1/conv"]
  codes = im.tensors[layer.kernel]
  assert codes.bits == 2 and codes.data.nbytes == -(-np.prod(codes.shape) * 2 // 8)


def _used(im, variant):
  names = {n for layer in im.variants[variant].layers.values() for n in layer if isinstance(n, str)}
  return {k: v for k, v in im.tensors.items() if k in names}


def test_truncated_or_altered_files_are_rejected():
  _, _, _, im = build(CASE)
  data = export.to_bytes(im)
  for cut in (0, 7, HEADER.size, HEADER.size + 100, len(data) // 2, len(data) - 33, len(data) - 1):
    _expect_error(data[:cut])
  _expect_error(data + b"\0", "header.lengths")
  _expect_error(b"NOTQFLAX" + data[8:], "magic")
  rng = random.Random(0)
  for position in rng.sample(range(HEADER.size, len(data)), 20):   # manifest, payload or checksum
    altered = bytearray(data)
    altered[position] ^= 1 << rng.randrange(8)
    _expect_error(bytes(altered), "sha256")


def test_forged_huge_tensor_fails_before_allocating():
  manifest, _ = _parts(export.to_bytes(build(CASE)[3]))
  manifest["tensors"] = {"t0": {"dtype": "float32", "shape": [20000, 20000], "offset": 0,
                                "length": 4 * 20000 * 20000}}
  manifest["variants"] = {}
  data = _forge(manifest, b"\0" * 64)
  assert len(data) < 2048
  tracemalloc.start()
  try:
    message = _expect_error(data, "tensors.t0.length")
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 50 * 2**20 and "exceeds the payload" in message
  manifest["tensors"]["t0"]["length"] = 64                        # consistent with the payload, not the shape
  _expect_error(_forge(manifest, b"\0" * 64), "tensors.t0.length")


def test_forged_files_naming_fields():
  data = export.to_bytes(build(CASE)[3])
  manifest, payload = _parts(data)
  layers = manifest["variants"]["w4a4"]["layers"]
  cases = [
      (lambda m: m["variants"]["w4a4"]["plan"]["w_bits"].__setitem__(0, 9), "variants.w4a4.plan.w_bits"),
      (lambda m: m["variants"]["w4a4"]["plan"]["w_bits"].__setitem__(0, 2), "variants.w4a4.layers.blocks_0/conv"),
      (lambda m: m["variants"]["w4a4"]["plan"]["w_bits"].append(4), "variants.w4a4.plan"),
      (lambda m: layers["blocks_0/conv"]["activation"]["params"].__setitem__("alpha", 1e999), "alpha"),
      (lambda m: layers["blocks_0/conv"].__setitem__("kernel", layers["blocks_1/conv"]["kernel"]),
       "variants.w4a4.layers.blocks_0/conv.kernel"),
      (lambda m: m["model"].__setitem__("num_classes", True), "model.num_classes"),
      (lambda m: m["model"]["options"].__setitem__("widths", [4, 8, 16]), "layers.blocks_2/conv.kernel"),
      (lambda m: m["spec"].__setitem__("act_quantizer", "clamp"), "activation.quantizer"),
      (lambda m: m["tensors"]["t0"].__setitem__("shape", [-1]), "tensors.t0.shape"),
      (lambda m: m["tensors"]["t1"].__setitem__("offset", m["tensors"]["t1"]["offset"] + 4), "offset"),
  ]
  for mutate, field in cases:
    forged = json.loads(json.dumps(manifest))
    layers = forged["variants"]["w4a4"]["layers"]
    mutate(forged)
    _expect_error(_forge(forged, payload), field)


def _mutate_bytes(text: bytes, rng: random.Random) -> bytes:
  i = rng.randrange(len(text))
  kind = rng.randrange(4)
  if kind == 0:
    return text[:i] + bytes([rng.choice(b'0123456789-.e"{}[],:tnx ')]) + text[i + 1:]
  if kind == 1:
    return text[:i] + text[i + 1:]
  if kind == 2:
    return text[:i] + bytes([rng.randrange(256)]) + text[i:]
  j = rng.randrange(len(text))
  return text[:i] + text[j:j + rng.randrange(1, 40)] + text[i:]


def _nodes(value, path=()):
  yield path
  children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
  for key, child in children:
    yield from _nodes(child, path + (key,))


REPLACEMENTS = [None, True, 0, -1, 1, 2**40, 1e308, 0.5, "", "x", "t0", [], {}, [1], {"a": 1}, "float32", "u4",
                [20000, 20000], 32, 9]


def _mutate_structure(manifest: dict, rng: random.Random) -> bytes:
  manifest = json.loads(json.dumps(manifest))
  path = rng.choice(list(_nodes(manifest))[1:])
  parent = manifest
  for key in path[:-1]:
    parent = parent[key]
  key, kind = path[-1], rng.randrange(4)
  old = parent[key]
  if kind == 0 or not isinstance(parent, dict):
    parent[key] = rng.choice(REPLACEMENTS + ([old + rng.choice([-1, 1, 7])] if isinstance(old, int) else []))
  elif kind == 1:
    del parent[key]
  elif kind == 2:
    parent[key + "x"] = parent.pop(key)
  else:
    parent[rng.choice(["extra", "t999", key])] = rng.choice(REPLACEMENTS)
  return json.dumps(manifest, separators=(",", ":")).encode()


def test_fuzzed_manifests_load_or_raise_export_file_error():
  """300 mutations of the manifest, lengths and checksum recomputed. A forger can write any valid
  model, so a mutation may also load as a *different* valid model (e.g. another clip value); what
  must never happen is another exception, or a loaded model that does not round-trip."""
  original = export.to_bytes(build(CASE)[3])
  manifest, payload = _parts(original)
  text = original[HEADER.size:HEADER.size + HEADER.unpack_from(original)[2]]
  rng = random.Random(0)
  outcomes = {"error": 0, "original": 0, "other valid model": 0}
  for i in range(300):
    mutated = _mutate_bytes(text, rng) if i % 2 else _mutate_structure(manifest, rng)
    try:
      loaded = export.from_bytes(_forge(mutated, payload))
    except export.ExportFileError as e:
      assert "\n" not in str(e)
      outcomes["error"] += 1
      continue
    except Exception as e:   # noqa: BLE001 - the property under test
      pytest.fail(f"mutation {i} raised {type(e).__name__}: {e}")
    again = export.to_bytes(loaded)
    assert export.to_bytes(export.from_bytes(again)) == again
    outcomes["original" if again == original else "other valid model"] += 1
  assert outcomes["error"] >= 200, outcomes


def test_what_is_not_a_file_s_bytes_is_a_type_error():
  """Reported: ``from_bytes("abc")`` was reported as a truncated file, ``from_bytes(None)`` as a
  TypeError from ``len``."""
  for not_bytes in ("QFLAXINT", None, [1, 2]):
    with pytest.raises(TypeError, match=f"from_bytes takes the file's bytes, not {type(not_bytes).__name__}"):
      export.from_bytes(not_bytes)
  _expect_error(bytearray(b"QFLAXINT"), "header")

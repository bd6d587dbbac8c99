"""Compressed-model files with a valid checksum but a forged header fail with CompressedFileError, fast."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qflax.methods.tq import codec
from qflax.methods.tq.compress import QuantizedLayer


def _block_values(rng, shape, rate, step):
  if rate == 0:
    return np.zeros(shape)
  half = 2 ** (rate - 1)
  return (rng.integers(0, 2 ** rate, size=shape) - half) * step


def _layers():
  """Two small layers whose arrays are exactly representable at their rates (so they round-trip)."""
  rng = np.random.default_rng(0)
  # conv (3, 3, 2, 4) in row mode: T is (2, 36), S is (2, 2) with its own rates.
  t = np.concatenate([_block_values(rng, (1, 36), 3, 0.5), _block_values(rng, (1, 36), 0, 0.0)])
  s = np.concatenate([_block_values(rng, (2, 1), 2, 0.25), _block_values(rng, (2, 1), 5, 0.125)], axis=1)
  conv = QuantizedLayer(("params", "Conv_0", "kernel"), (3, 3, 2, 4), "row", [(0, 1), (1, 2)], [3, 0], [0.5, 0.0],
                        [2, 5], [0.25, 0.125], s, t)
  # dense (5, 3) in column mode: T is (3, 5), S the identity (not stored).
  t = np.concatenate([_block_values(rng, (2, 5), 8, 0.01), _block_values(rng, (1, 5), 1, 2.0)])
  dense = QuantizedLayer(("params", "Dense_0", "kernel"), (5, 3), "column", [(0, 2), (2, 3)], [8, 1], [0.01, 2.0],
                         [], [], np.eye(3), t)
  return [conv, dense]


OTHERS = {"batch_stats": {"BN_0": {"mean": np.arange(4, dtype=np.float32), "var": np.ones(4, np.float32)}},
          "extra": {"scalar": np.float32(3.5)}}


@pytest.fixture(scope="module")
def valid():
  return codec.encode(_layers(), OTHERS)


def _split(data: bytes):
  (head_len,) = struct.unpack("<Q", data[5:13])
  return json.loads(data[13:13 + head_len]), data[13 + head_len:-4]


def _seal(body: bytes) -> bytes:
  return body + struct.pack("<I", zlib.crc32(body))


def _forge(data: bytes, head: bytes, payload: bytes | None = None) -> bytes:
  """``data`` with its header replaced by ``head`` (and optionally its payload), checksum recomputed."""
  payload = _split(data)[1] if payload is None else payload
  return _seal(data[:5] + struct.pack("<Q", len(head)) + head + payload)


def _edit(data: bytes, change) -> bytes:
  header = _split(data)[0]
  change(header)
  return _forge(data, json.dumps(header).encode())


def _assert_equal(a, b):
  layers_a, others_a = a
  layers_b, others_b = b
  assert len(layers_a) == len(layers_b)
  for x, y in zip(layers_a, layers_b):
    assert (x.path, x.shape, x.mode, [tuple(p) for p in x.bounds]) == (y.path, y.shape, y.mode,
                                                                         [tuple(p) for p in y.bounds])
    assert (x.t_rates, x.t_steps, x.s_rates, x.s_steps) == (y.t_rates, y.t_steps, y.s_rates, y.s_steps)
    np.testing.assert_array_equal(x.T, y.T)
    np.testing.assert_array_equal(x.S, y.S)
  flat = lambda d: {k: np.asarray(v) for k, v in _flatten(d)}
  fa, fb = flat(others_a), flat(others_b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k])


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def test_valid_file_round_trips_exactly(valid):
  _assert_equal(codec.decode(valid), (_layers(), OTHERS))


def _fails(data: bytes, match: str):
  with pytest.raises(codec.CompressedFileError, match=match) as info:
    codec.decode(data)
  assert "\n" not in str(info.value)


def test_header_that_is_not_utf8_json_or_an_object(valid):
  _fails(_forge(valid, b'{"layers": "\xff\xfe"}'), "not UTF-8")
  _fails(_forge(valid, b'{"layers": [1, 2'), "not valid JSON")
  _fails(_forge(valid, b'{"layers": [' + b"1" * 5000 + b"]}"), "not valid JSON")   # int digits limit
  _fails(_forge(valid, b"[]"), "header must be a JSON object")
  _fails(_forge(valid, b""), "not valid JSON")


@pytest.mark.parametrize("head", [b"[" * 100000, b"{\"a\":" * 50000, b"[" * 500 + b"]" * 500,
                                  b'{"layers": [[[[[[[[[[]]]]]]]]]], "params": []}'])
def test_deeply_nested_header_is_rejected_before_parsing(valid, head):
  start = time.perf_counter()
  _fails(_forge(valid, head), "nests")
  assert time.perf_counter() - start < 1.0


def test_brackets_inside_strings_do_not_count_as_nesting(valid):
  def change(h):
    h["layers"][0]["path"] = ["[[[[[[[[[[[[\\\"{{{{{{{{{{{{"] + h["layers"][0]["path"][1:]
  layers, _ = codec.decode(_edit(valid, change))
  assert layers[0].path[0] == "[[[[[[[[[[[[\\\"{{{{{{{{{{{{"


@pytest.mark.parametrize("key", ["path", "shape", "mode", "rows", "bounds", "t_rates", "t_steps", "s_rates",
                                 "s_steps"])
def test_missing_layer_keys(valid, key):
  _fails(_edit(valid, lambda h: h["layers"][1].pop(key)), f"layer 1 has missing keys.*{key}")


def test_missing_or_extra_top_level_and_param_keys(valid):
  _fails(_edit(valid, lambda h: h.pop("params")), "header has missing keys.*params")
  _fails(_edit(valid, lambda h: h.update(extra=1)), "header has .*unexpected keys.*extra")
  _fails(_edit(valid, lambda h: h["params"][0].pop("shape")), "param 0 has missing keys.*shape")
  _fails(_edit(valid, lambda h: h["layers"][0].update(zz=1)), "layer 0 has .*unexpected keys.*zz")
  _fails(_edit(valid, lambda h: h.update(layers={})), "'layers' must be a list")
  _fails(_edit(valid, lambda h: h["layers"].append(3)), "layer 2 must be a JSON object")


@pytest.mark.parametrize("key,value,match", [
    ("rows", ["2", 36], "layer 0: rows must be a list of integers"),
    ("rows", [2.0, 36], "layer 0: rows must be a list of integers"),
    ("rows", [2, 36, 1], "layer 0: rows must have 2 entries"),
    ("rows", [2, 35], "layer 0: rows .* do not match kernel shape"),
    ("rows", [4, 18], "layer 0: rows .* do not match kernel shape"),
    ("rows", [0, 36], "layer 0: rows must be integers >= 1"),
    ("shape", [3, 3, -2, 4], "layer 0: shape must be integers >= 1"),
    ("shape", [3, 3, 0, 4], "layer 0: shape must be integers >= 1"),
    ("shape", [72], "layer 0: shape .* is not a 2-D or 4-D kernel"),
    ("shape", "3x3", "layer 0: shape must be a list of integers"),
    ("mode", "diagonal", "layer 0: mode 'diagonal'"),
    ("mode", ["row"], "layer 0: mode"),
    ("path", "params/Conv_0", "layer 0: path must be a non-empty list of strings"),
    ("path", [], "layer 0: path must be a non-empty list of strings"),
    ("path", ["params", 1], "layer 0: path must be a non-empty list of strings"),
    ("t_rates", [3.0, 0], "layer 0: t_rates must be a list of integers"),
    ("t_rates", [True, 0], "layer 0: t_rates must be a list of integers"),
    ("t_rates", [9, 0], r"layer 0: t_rates must be integers in 0\.\.8"),
    ("t_rates", [-1, 0], r"layer 0: t_rates must be integers in 0\.\.8"),
    ("t_rates", [3], "layer 0: t_rates must have 2 entries"),
    ("s_rates", [2, 9], r"layer 0: s_rates must be integers in 0\.\.8"),
    ("s_rates", [2], "layer 0: s_rates has 1 entries for 2 blocks"),
    ("t_steps", ["0.5", 0.0], "layer 0: t_steps must be a list of numbers"),
    ("t_steps", [0.5], "layer 0: t_steps has 1 entries for 2 blocks"),
    ("t_steps", [float("nan"), 0.0], r"layer 0: t_steps\[0\] = nan is not a finite positive step"),
    ("t_steps", [float("inf"), 0.0], r"layer 0: t_steps\[0\] = inf"),
    ("t_steps", [0.0, 0.0], r"layer 0: t_steps\[0\] = 0.0 is not a finite positive step for rate 3"),
    ("t_steps", [-0.5, 0.0], r"layer 0: t_steps\[0\]"),
    ("t_steps", [1e308, 0.0], r"layer 0: t_steps\[0\] = 1e\+308 is not a finite positive step for rate 3"),
    ("t_steps", [0.5, float("nan")], r"layer 0: t_steps\[1\] = nan"),
    ("s_steps", [0.25], "layer 0: s_steps has 1 entries for 2 blocks"),
    ("bounds", [[0, 1]], "layer 0: bounds end at row 1 but the layer has 2 rows"),
    ("bounds", [[0, 1], [1, 3]], "layer 0: bounds end at row 3 but the layer has 2 rows"),
    ("bounds", [[0, 1], [2, 2]], r"layer 0: bounds\[1\] = \[2, 2\] does not continue"),
    ("bounds", [[1, 2], [0, 1]], r"layer 0: bounds\[0\] = \[1, 2\] does not continue the blocks at row 0"),
    ("bounds", [[0, 2], [2, 1]], r"layer 0: bounds\[1\]"),
    ("bounds", [[0, 1.0], [1, 2]], r"layer 0: bounds\[0\] must be a list of integers"),
    ("bounds", [[0, 1, 2]], r"layer 0: bounds\[0\] must have 2 entries"),
    ("bounds", [], "layer 0: bounds must be a non-empty list"),
    ("bounds", {"0": 1}, "layer 0: bounds must be a non-empty list"),
])
def test_wrong_layer_field_types_and_values(valid, key, value, match):
  _fails(_edit(valid, lambda h: h["layers"][0].__setitem__(key, value)), match)


def test_param_and_path_errors(valid):
  _fails(_edit(valid, lambda h: h["params"][0].__setitem__("shape", [-4])), "param 0: shape must be integers >= 0")
  _fails(_edit(valid, lambda h: h["params"][0].__setitem__("shape", [2, 2.0])), "param 0: shape must be a list of")
  _fails(_edit(valid, lambda h: h["params"][1].__setitem__("path", h["params"][0]["path"])), "param 0: .*repeated")
  _fails(_edit(valid, lambda h: h["params"][0].__setitem__("path", ["extra"])), r"param \d: .*nested")
  _fails(_edit(valid, lambda h: h["layers"][1].__setitem__("path", h["layers"][0]["path"])), "layer 1: .*twice")
  _fails(_edit(valid, lambda h: h.__setitem__("params", {"a": 1})), "'params' must be a list")


def test_size_mismatches_and_trailing_data(valid):
  _fails(_edit(valid, lambda h: h["params"][0].__setitem__("shape", [5])), "shorter than its header says")
  _fails(_edit(valid, lambda h: h["params"][0].__setitem__("shape", [3])), "trailing data")
  _fails(_edit(valid, lambda h: h["params"][0].__setitem__("shape", [10 ** 40])), "shorter than its header says")
  payload = _split(valid)[1]
  _fails(_forge(valid, json.dumps(_split(valid)[0]).encode(), payload + b"\0"), "trailing data")
  _fails(_edit(valid, lambda h: h["layers"][0].update(t_rates=[8, 8], t_steps=[1.0, 1.0])), "layer 0: .*payload holds")


def test_out_of_range_codes_in_the_payload(valid):
  payload = bytearray(_split(valid)[1])
  payload[15] = 255        # the first 5-bit S code of layer 0 (after 14 + 1 bytes of 3- and 2-bit codes)
  _fails(_forge(valid, json.dumps(_split(valid)[0]).encode(), bytes(payload)), r"layer 0 block 1 \(S\).*out of range")


def test_header_length_pointing_past_the_end(valid):
  for length in (len(valid), len(valid) - 16, 2 ** 64 - 1):
    _fails(_seal(valid[:5] + struct.pack("<Q", length) + valid[13:-4]), "points past the end")


def _fast_and_small(data: bytes, match: str):
  tracemalloc.start()
  start = time.perf_counter()
  try:
    _fails(data, match)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert elapsed < 1.0
  assert peak < 50 * 2 ** 20


def _huge_layer(n: int, rates: int) -> dict:
  return {"path": ["params", "Dense_9", "kernel"], "shape": [n, n], "mode": "row", "rows": [n, n],
          "bounds": [[0, n]], "t_rates": [rates], "t_steps": [0.5 if rates else 0.0], "s_rates": [rates],
          "s_steps": [0.5 if rates else 0.0]}


@pytest.mark.parametrize("n", [20000, 10 ** 6, 10 ** 30, 10 ** 3000])
def test_huge_rows_fail_fast_without_allocating(valid, n):
  _fast_and_small(_edit(valid, lambda h: h["layers"][1].__setitem__("rows", [n, n])), "layer 1: rows")
  # Consistent shape and bounds: caught by the payload size the header implies.
  _fast_and_small(_edit(valid, lambda h: h["layers"].__setitem__(1, _huge_layer(n, 3))),
                  r"layer 1: rows \[\d+.* imply (\d+|about 2\^\d+) weights but the payload holds")
  # Rate 0 takes no payload bytes: caught by the cap on weights per file byte.
  _fast_and_small(_edit(valid, lambda h: h["layers"].__setitem__(1, _huge_layer(n, 0))), "may describe")
  _fast_and_small(_forge(valid, json.dumps({"layers": [_huge_layer(n, 0)], "params": []}).encode(), b""),
                  "may describe")


def test_float_rows_are_rejected(valid):
  _fast_and_small(_edit(valid, lambda h: h["layers"][1].__setitem__("rows", [1e6, 1e6])),
                  "layer 1: rows must be a list of integers")


def test_load_prefixes_the_path(valid, tmp_path):
  path = tmp_path / "forged.tq"
  path.write_bytes(_forge(valid, b"[" * 1000))
  with pytest.raises(codec.CompressedFileError, match=f"^{path}: header JSON nests"):
    codec.load(str(path))


def _check_outcome(data: bytes, original_header: dict, expected):
  """Decoding forged ``data`` either fails with CompressedFileError or gives a consistent result
  (equal to ``expected`` when the header still means the same)."""
  try:
    result = codec.decode(data)
  except codec.CompressedFileError:
    return
  (head_len,) = struct.unpack("<Q", data[5:13])
  if json.loads(data[13:13 + head_len]) == original_header:
    _assert_equal(result, expected)
  for layer in result[0]:
    assert layer.T.size == np.prod(layer.shape) and layer.S.shape == (len(layer.T), len(layer.T))


_MUTATION = st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=_MUTATION)
def test_fuzzed_header_bytes_fail_cleanly_or_decode_consistently(valid, mutations):
  header, _ = _split(valid)
  end = 13 + struct.unpack("<Q", valid[5:13])[0]
  body = bytearray(valid[:-4])
  for position, value in mutations:
    body[4 + position % (end - 4)] = value        # the version byte, header length or JSON header
  _check_outcome(_seal(bytes(body)), header, (_layers(), OTHERS))


def test_random_token_mutations_of_the_header_fail_cleanly_or_decode_consistently(valid):
  """Mutations that keep the JSON mostly valid: digits, signs and punctuation swapped in the header text."""
  rng = np.random.default_rng(1)
  header, payload = _split(valid)
  text = json.dumps(header)
  alphabet = list("0123456789-.e,[]{}\" ") + ["1e6", "20000", "true", "null", "NaN", "-0", "9", "8"]
  for _ in range(300):
    chars = list(text)
    for _ in range(rng.integers(1, 4)):
      chars[rng.integers(len(chars))] = alphabet[rng.integers(len(alphabet))]
    _check_outcome(_forge(valid, "".join(chars).encode(), payload), header, (_layers(), OTHERS))

"""The bottom floor: argument checks and atomic writes."""

import os
import stat

import numpy as np
import pytest

from catjax.base.checks import check_bits, check_bool, check_int, is_ratio, is_real
from catjax.base.errors import atomic_write, write_text


@pytest.mark.parametrize("v, real, ratio", [
    (0.5, True, True), (1, True, True), (np.float32(0.25), True, True), (0.0, True, False),
    (1.5, True, False), (float("nan"), False, False), (float("inf"), False, False),
    (True, False, False), ("0.5", False, False), (None, False, False)])
def test_predicates(v, real, ratio):
  assert is_real(v) is real
  assert is_ratio(v) is ratio


@pytest.mark.parametrize("bits", [2, 4, 8, None])
def test_check_bits_takes(bits):
  check_bits("w_bits", bits)


@pytest.mark.parametrize("bits", [1, 9, True, 4.0, "4"])
def test_check_bits_names_the_value(bits):
  with pytest.raises(ValueError, match=r"w_bits=.*expected an integer in 2\.\.8"):
    check_bits("w_bits", bits)


def test_check_int_and_bool():
  check_int("steps", 0, 0)
  check_bool("flag", np.bool_(True))
  with pytest.raises(ValueError, match=r"steps=-1: expected an integer >= 0"):
    check_int("steps", -1, 0)
  with pytest.raises(ValueError, match=r"steps=True"):
    check_int("steps", True, 0)
  check_int("steps", 7, 0, 7)
  with pytest.raises(ValueError, match=r"steps=8: expected an integer in 0\.\.7 \(int32\)"):
    check_int("steps", 8, 0, 7, "int32")
  with pytest.raises(ValueError, match=r"flag=1: expected True or False"):
    check_bool("flag", 1)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_take_the_umask(tmp_path, mask):
  """Files written through atomic_write get the mode open() would give, not mkstemp's 0600."""
  old = os.umask(mask)
  try:
    path = write_text(tmp_path / "report.md", "x\n")
    with atomic_write(tmp_path / "data.bin") as tmp, open(tmp, "wb") as fh:
      fh.write(b"\0")
  finally:
    os.umask(old)
  for p in (path, tmp_path / "data.bin"):
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, (p, oct(p.stat().st_mode))


def test_interrupted_write_leaves_no_file(tmp_path):
  """`atomic_write`: an interrupt while writing leaves neither the target nor a temp file."""
  target = tmp_path / "stats.npz"
  with pytest.raises(KeyboardInterrupt):
    with atomic_write(target) as tmp:
      tmp.write_bytes(b"partial")
      raise KeyboardInterrupt
  assert list(tmp_path.iterdir()) == []
  with atomic_write(target) as tmp:
    tmp.write_bytes(b"whole")
  assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]

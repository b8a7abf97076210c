"""The CLI's error policy on bad input, as a user meets it: exit status 2, one
line on stderr naming the file or flag and the problem, no traceback, and no
work (or output file) lost to a problem that could have been seen first.

The loaders' and the math's own cases live beside the tests of those modules."""

import re

import numpy as np
import pytest

import tiny

from catjax.app import runnable
from catjax.app import cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Two tiny models of the same shape, a text, and statistics saved from the first."""
  path, text = tiny.folder_and_text(tmp_path_factory, "bad_inputs", seed=12)
  other = path.parent / "other"
  tiny.hf_folder(other, seed=13)
  stats = path.parent / "stats.npz"
  assert cli.main(["quantize", *_common(path, text), "--method", "hadamard",
                   "--save-stats", str(stats)]) == 0
  return path, text, other, stats


def _common(path, text):
  return ["--model", str(path), "--calib-text", str(text), "--eval-text", str(text),
          "--seqlen", "16", "--calib-windows", "4", "--report-windows", "1",
          "--eval-max-tokens", "32", "--no-progress"]


def _variant(stats, tmp_path, kind):
  """A corrupted copy of the statistics file."""
  out = tmp_path / f"{kind}.npz"
  if kind == "truncated":
    out.write_bytes(stats.read_bytes()[:1000])
  elif kind == "negated":
    with np.load(stats) as z:
      arrays = {k: (-z[k] if k.endswith((".xx", ".xx_upper")) else z[k]) for k in z.files}
    np.savez(out, **arrays)
  elif kind == "nan":
    with np.load(stats) as z:
      arrays = {k: z[k] for k in z.files}
    key = next(k for k in arrays if k.endswith((".xx", ".xx_upper")))
    arrays[key] = arrays[key].copy()
    arrays[key].flat[3] = np.nan
    np.savez(out, **arrays)
  elif kind == "text":
    out.write_text("not statistics")
  else:  # a second moment or the metadata edited
    with np.load(stats) as z:
      arrays = {k: z[k] for k in z.files}
    key = next(k for k in sorted(arrays) if k.endswith(".xx_upper"))
    site = key[:-len(".xx_upper")]
    d = arrays[f"{site}.absmax"].shape[-1]
    xx = np.zeros(arrays[key].shape[:-1] + (d, d), np.float32)
    rows, cols = np.triu_indices(d)
    xx[..., rows, cols] = arrays[key]
    xx[..., cols, rows] = arrays[key]
    if kind in ("asymmetric", "off-diagonal x3", "indefinite"):
      del arrays[key]
      m = xx[1]
      if kind == "asymmetric":
        m[0, 1] += 0.5 * m[0, 0]
      elif kind == "off-diagonal x3":
        m[:] = np.diag(np.diag(m)) + 3 * (m - np.diag(np.diag(m)))
      else:  # every correlation within [-1, 1] (Cauchy–Schwarz), jointly impossible
        c = np.eye(d)
        c[:3, :3] = [[1, 0.9, 0.9], [0.9, 1, -0.9], [0.9, -0.9, 1]]
        s = np.sqrt(np.diag(m))
        m[:] = c * np.outer(s, s)
      arrays[f"{site}.xx"] = xx
    elif kind == "meta list":
      arrays["meta"] = np.asarray("[1, 2]")
    elif kind == "meta types":
      import json
      meta = json.loads(str(arrays["meta"]))
      arrays["meta"] = np.asarray(json.dumps({**meta, "windows": "four"}))
    np.savez(out, **arrays)
  return out


def _one_error_line(capsys, *words):
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("catjax "), err
  for w in words:
    assert re.search(w, lines[0]), (w, lines[0])
  return lines[0]


def _no_model_load(monkeypatch):
  """Fail the test if the model is loaded: the error must come before any work."""
  def refuse(*a, **k):
    raise AssertionError("the model was loaded before the error was found")
  monkeypatch.setattr(runnable, "load_pretrained", refuse)


@pytest.mark.parametrize("case, flags, words", [
    ("json is a folder", ["--json", "{tmp}"], [r"report file .* is a folder"]),
    ("json under a file", ["--json", "{file}/out.json"], [r"is not a folder", "file.txt"]),
    ("stats under a file", ["--save-stats", "{file}/s.npz"],
     [r"statistics file .*file\.txt/s\.npz", "not a folder"]),
    ("stats is a folder", ["--save-stats", "{tmp}"], ["statistics file", "is a folder"]),
    ("bad method option", ["--method", "cat", "--w-bits", "4", "--block-size", "0"],
     None),  # argparse's own error (exit 2)
])
def test_outputs_checked_before_any_work(setup, tmp_path, monkeypatch, capsys, case, flags,
                                         words):
  path, text, _, _ = setup
  (tmp_path / "file.txt").write_text("x")
  flags = [f.format(tmp=tmp_path, file=tmp_path / "file.txt") for f in flags]
  _no_model_load(monkeypatch)
  if words is None:
    with pytest.raises(SystemExit) as e:
      cli.main(["quantize", *_common(path, text), *flags])
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err
    return
  assert cli.main(["quantize", *_common(path, text), *flags]) == 2
  _one_error_line(capsys, *words)
  assert not (tmp_path / "file.txt.npz").exists()


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_json_checked_first(setup, tmp_path, monkeypatch, capsys, command):
  path, text, _, _ = setup
  (tmp_path / "file.txt").write_text("x")
  import catjax.app.runnable as ck

  def refuse(*a, **k):
    raise AssertionError("the model was loaded before the error was found")
  monkeypatch.setattr(ck, "load_runnable", refuse)
  extra = ["--prompt", "hi"] if command == "generate" else ["--eval-text", str(text)]
  assert cli.main([command, "--model", str(path), *extra,
                   "--json", str(tmp_path / "file.txt" / "r.json")]) == 2
  _one_error_line(capsys, "--json", "not a folder")


@pytest.mark.parametrize("kind, flags, words", [
    ("other model", [], ["come from another model", "fingerprint", "recalibrate"]),
    ("truncated", [], ["truncated.npz", "not a readable statistics file"]),
    ("text", [], ["text.npz", "not a readable statistics file"]),
    ("negated", [], ["negated.npz", "impossible", "negative second moment"]),
    ("nan", [], ["nan.npz", "non-finite"]),
    ("missing", [], ["no calibration statistics at", "missing.npz"]),
    ("asymmetric", [], ["asymmetric.npz", "in layer 1 are not symmetric"]),
    ("off-diagonal x3", [], ["in layer 1 break Cauchy–Schwarz"]),
    ("indefinite", [], ["in layer 1 are indefinite", "positive semidefinite"]),
    ("meta list", [], ["its metadata is a JSON list, expected an object"]),
    ("meta types", [], ["its metadata windows='four': expected a positive integer"]),
    ("good", ["--calib-windows", "3"], [r"calib_windows \(--calib-windows\)=3 but they used 4",
                                        "Leave these unset"]),
    ("good", ["--calib-text", "wiki-eval"], [r"--calib-text\)='wiki-eval' but they used"]),
])
def test_bad_statistics_refused(setup, tmp_path, capsys, kind, flags, words):
  path, text, other, stats = setup
  model = other if kind == "other model" else path
  if kind in ("other model", "good"):
    given = stats
  elif kind == "missing":
    given = tmp_path / "missing.npz"
  else:
    given = _variant(stats, tmp_path, kind)
  common = [a for a in _common(model, text)]
  if flags:  # the flag under test replaces the common one
    i = common.index(flags[0])
    common[i:i + 2] = flags
  assert cli.main(["quantize", *common, "--method", "hadamard", "--load-stats", str(given)]) == 2
  _one_error_line(capsys, *words)


def test_loaded_statistics_default_to_their_calibration(setup, capsys):
  """Without --calib-* flags the loaded statistics' own settings are used, not the defaults."""
  path, text, _, stats = setup
  common = [a for a in _common(path, text)]
  i = common.index("--calib-windows")
  del common[i:i + 2]
  assert cli.main(["quantize", *common, "--method", "hadamard", "--load-stats", str(stats)]) == 0


def test_statistics_loaded_and_saved_to_the_same_file(setup, tmp_path):
  """--load-stats F --save-stats F rewrites F with the same statistics (and metadata)."""
  path, text, _, stats = setup
  copy = tmp_path / "same.npz"
  copy.write_bytes(stats.read_bytes())
  assert cli.main(["quantize", *_common(path, text), "--method", "hadamard",
                   "--load-stats", str(copy), "--save-stats", str(copy)]) == 0
  with np.load(stats) as a, np.load(copy) as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      if k != "meta":
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("flags", [
    ["quantize", "--method", "hadamard", "--seed", str(2**64)],
    ["generate", "--prompt", "hi", "--seed", str(-2**63 - 1)],
    ["generate", "--prompt", "hi", "--temperature", "nan"],
    ["generate", "--prompt", "hi", "--temperature", "-1"],
], ids=["quantize seed", "generate seed", "temperature nan", "temperature -1"])
def test_bad_numbers_refused_before_any_work(setup, monkeypatch, capsys, flags):
  path, text, _, _ = setup
  _no_model_load(monkeypatch)
  monkeypatch.setattr(runnable, "load_runnable", lambda *a, **k: (_ for _ in ()).throw(
      AssertionError("the model was loaded before the error was found")))
  common = _common(path, text) if flags[0] == "quantize" else ["--model", str(path)]
  with pytest.raises(SystemExit) as e:
    cli.main([flags[0], *common, *flags[1:]])
  err = capsys.readouterr().err
  assert e.value.code == 2 and "Traceback" not in err
  assert re.search(r"(64-bit seed|finite number >= 0)", err), err


def test_gptq_without_damping_is_one_line(setup, capsys):
  """@d0: the undamped Hessian of these few tokens is singular; GPTQ's Cholesky fails and
  the CLI says so in one line, with what to raise."""
  path, text, _, _ = setup
  assert cli.main(["compare", *_common(path, text), "--methods", "cat@k16@gptq@d0"]) == 2
  _one_error_line(capsys, r"block \d+, \w+/\w+ \(site \w+\): ", "Cholesky", "raise damping")


def test_debug_shows_the_traceback(setup, tmp_path):
  path, text, _, _ = setup
  with pytest.raises(ValueError, match="not a readable statistics file"):
    cli.main(["quantize", *_common(path, text), "--method", "hadamard", "--debug",
              "--load-stats", str(_variant(setup[3], tmp_path, "text"))])


def test_recipe_checked_against_the_config_before_the_weights_load(setup, monkeypatch, capsys):
  path, text, _, _ = setup
  _no_model_load(monkeypatch)
  assert cli.main(["compare", *_common(path, text), "--methods", "fp,cat@k48"]) == 2
  _one_error_line(capsys, "block_size=48 does not divide")


def test_seqlen_past_the_model_warns(setup, tmp_path, caplog):
  """The tiny model has max_position_embeddings=256: a 512-token window is past it."""
  path, _, _, _ = setup
  long_text = tmp_path / "long.txt"
  long_text.write_text(tiny.TEXT * 40)
  with caplog.at_level("WARNING", logger="catjax"):
    assert cli.main(["eval", "--model", str(path), "--eval-text", str(long_text),
                     "--seqlen", "512", "--max-tokens", "512", "--no-progress"]) == 0
  assert any("seqlen=512 exceeds the model's max_position_embeddings=256" in r.message
             for r in caplog.records)


@pytest.mark.parametrize("case", ["NaN weight", "int32 weight", "truncated safetensors",
                                  "index names a missing shard", "config not JSON",
                                  "config missing vocab_size", "rope_theta 0", "rms_norm_eps NaN"])
def test_bad_model_files_through_the_cli(setup, tmp_path, capsys, case):
  """The loader cases of `tests/models/test_loading.py`, as `catjax eval` reports them."""
  import shutil

  from models.test_loading import HF_BAD
  edit, file, words, _ = HF_BAD[case]
  folder = tmp_path / "m"
  shutil.copytree(setup[0], folder)
  edit(folder)
  assert cli.main(["eval", "--model", str(folder), "--eval-text", str(setup[1]),
                   "--seqlen", "16", "--max-tokens", "32", "--no-progress"]) == 2
  _one_error_line(capsys, *map(re.escape, [str(folder / file).rstrip("/."), *words]))

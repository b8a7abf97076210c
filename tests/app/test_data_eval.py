"""Text split, windows, perplexity (against transformers' loss) and the CLI; bad text files
are refused naming the file."""

import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import tiny
from catjax.app import cli
from catjax.app.data import make_windows, split_articles, text_windows
from catjax.base.errors import InputError
from catjax.analysis.evaluate import perplexity, token_nll
from catjax.models import forward, load_hf, random_model


def _articles(n=200):
  return {f"Title {i}": {"title": f"Title {i}", "extract": f"Text of article {i}."}
          for i in range(n)}


def test_wiki_split_is_disjoint_complete_and_deterministic():
  arts = _articles()
  ev, cal = split_articles(arts, "eval"), split_articles(arts, "calib")
  assert not set(ev) & set(cal)
  assert sorted(ev + cal) == sorted(a["extract"] for a in arts.values())
  assert 60 < len(cal) < 140  # about half
  shuffled = dict(reversed(list(arts.items())))
  assert split_articles(shuffled, "eval") == ev  # order set by the hash, not the input
  with pytest.raises(ValueError, match="part='test'"):
    split_articles(arts, "test")


def test_make_windows_budget_and_errors():
  toks = np.arange(100)
  w = make_windows(toks, 16)
  assert w.shape == (6, 16) and w[1, 0] == 16
  assert make_windows(toks, 16, max_tokens=40).shape == (2, 16)
  with pytest.raises(ValueError, match="no window of seqlen=16 fits"):
    make_windows(toks, 16, max_tokens=10)
  with pytest.raises(ValueError, match="seqlen=1"):
    make_windows(toks, 1)


def test_text_file_windows(tmp_path):
  f = tmp_path / "t.txt"
  f.write_text(tiny.TEXT)
  w = text_windows(tiny.tokenizer(), str(f), seqlen=8, max_tokens=64)
  assert w.tokens.shape == (8, 8)
  assert w.to_dict() == {"data": str(f), "seqlen": 8, "windows": 8, "tokens": 64}
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(ValueError, match="is empty"):
    text_windows(tiny.tokenizer(), str(tmp_path / "empty.txt"), seqlen=8)
  with pytest.raises(ValueError, match="neither one of"):
    text_windows(tiny.tokenizer(), str(tmp_path / "nope.txt"), seqlen=8)


def test_perplexity_is_exp_of_mean_token_nll():
  model = random_model(tiny.config(), seed=2)
  windows = tiny.tokens((5, 12), 128, seed=2)
  result = perplexity(model, windows, batch_size=2, progress=False)
  nll = np.asarray(token_nll(forward(model, windows), windows))
  assert result.windows == 5 and result.tokens == 60 and result.predicted_tokens == 55
  assert result.perplexity == pytest.approx(math.exp(nll.mean()), rel=1e-6)
  assert result.dtype == "float32" and result.seqlen == 12


def test_perplexity_equals_transformers_loss(tmp_path):
  pytest.importorskip("torch")
  import torch
  ref = tiny.torch_model("LlamaForCausalLM", seed=3)
  ref.save_pretrained(tmp_path)
  windows = tiny.tokens((4, 32), ref.config.vocab_size, seed=3)
  with torch.no_grad():
    t = torch.tensor(windows, dtype=torch.long)
    loss = float(ref(t, labels=t).loss)
  ours = perplexity(load_hf(tmp_path), windows, progress=False)
  assert ours.perplexity == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("cli") / "tiny"
  tiny.hf_folder(path, seed=4)
  text = path.parent / "text.txt"
  text.write_text(tiny.TEXT)
  return path, text


def test_cli_eval_writes_report(model_dir, tmp_path, capsys):
  path, text = model_dir
  out = tmp_path / "r" / "ppl.json"
  assert cli.main(["eval", "--model", str(path), "--eval-text", str(text), "--seqlen", "16",
                   "--max-tokens", "64", "--json", str(out), "--no-progress"]) == 0
  report = json.loads(out.read_text())
  assert report["windows"] == 4 and report["seqlen"] == 16 and report["tokens"] == 64
  assert report["perplexity"] > 1 and math.isfinite(report["perplexity"])
  assert f"{report['perplexity']:.4f}" in capsys.readouterr().out


def test_cli_errors_are_clear(model_dir, capsys):
  path, text = model_dir
  assert cli.main(["eval", "--model", str(path), "--eval-text", str(text), "--seqlen", "16",
                   "--max-tokens", "8", "--no-progress"]) == 2
  assert "no window of seqlen=16 fits" in capsys.readouterr().err
  assert cli.main(["eval", "--model", "no-such-model"]) == 2
  assert "neither an existing path nor a known name" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["eval", "--seqlen", "0"])


def test_python_m_catjax_generate(model_dir):
  path, _ = model_dir
  run = subprocess.run([sys.executable, "-m", "catjax", "generate", "--model", str(path),
                        "--prompt", "Paris is", "--max-new-tokens", "4"],
                       capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu",
                                                            "PATH": "/usr/bin:/bin"})
  assert run.returncode == 0, run.stderr
  assert run.stdout.startswith("Paris is")
  model = load_hf(path)
  from catjax.models import generate
  ids = tiny.tokenizer()("Paris is", add_special_tokens=False)["input_ids"]
  assert run.stdout.rstrip("\n") == "Paris is" + tiny.tokenizer().decode(
      generate(model, ids, max_new_tokens=4), skip_special_tokens=True)


# --- bad text files ----------------------------------------------------------------------

def test_edited_text_file_is_tokenized_again(tmp_path):
  f = tmp_path / "t.txt"
  f.write_text(tiny.TEXT)
  first = text_windows(tiny.tokenizer(), str(f), seqlen=8).tokens
  st = f.stat()
  f.write_text(tiny.TEXT.upper())  # same size
  os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
  again = text_windows(tiny.tokenizer(), str(f), seqlen=8).tokens
  assert not np.array_equal(first[: len(again)], again[: len(first)])


TEXT_BAD = {
    "too short": ("Paris is the capital.", 64, ["too short", "seqlen=64", "tokens available"]),
    "empty": ("  \n", 8, ["empty"]),
    "not UTF-8": (b"caf\xe9 au lait " * 20, 8, ["not UTF-8", "byte 3"]),
}


@pytest.mark.parametrize("case", list(TEXT_BAD))
def test_bad_text_files(tmp_path, case):
  text, seqlen, words = TEXT_BAD[case]
  f = tmp_path / "t.txt"
  f.write_bytes(text if isinstance(text, bytes) else text.encode())
  tiny.raises(InputError, words, text_windows, tiny.tokenizer(), str(f), seqlen=seqlen, path=f)


def test_seqlen_beyond_the_models_positions_warns(tmp_path, caplog):
  f = tmp_path / "t.txt"
  f.write_text(tiny.TEXT)
  with caplog.at_level(logging.WARNING, logger="catjax"):
    text_windows(tiny.tokenizer(), str(f), seqlen=32, max_positions=16)
  warned = [r for r in caplog.records if r.name == "catjax"]
  assert len(warned) == 1 and "seqlen=32" in warned[0].getMessage()
  assert "max_position_embeddings=16" in warned[0].getMessage()
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="catjax"):
    text_windows(tiny.tokenizer(), str(f), seqlen=16, max_positions=16)
  assert not [r for r in caplog.records if r.name == "catjax"]


def test_no_pytorch_notice_when_loading_a_tokenizer(model_dir):
  """Without torch, transformers' "PyTorch was not found" notice is dropped; its other
  messages are kept."""
  code = ("import sys; sys.modules['torch'] = None\n"
          "from catjax.app.data import load_tokenizer\n"
          f"load_tokenizer({str(model_dir[0])!r})\n"
          "import transformers\n"
          "transformers.logging.get_logger('transformers').warning('another notice')\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        check=False, timeout=3600)  # only a hang takes this long
  assert done.returncode == 0, done.stderr
  assert "PyTorch was not found" not in done.stderr
  assert "another notice" in done.stderr

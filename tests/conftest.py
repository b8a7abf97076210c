import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _compilation_cache():
  """JAX's persistent compilation cache for the tests (and the subprocesses they start),
  in the asset cache folder: XLA's compile time is most of this suite's time, and a
  rerun finds each program compiled (entries are keyed by program, jax/jaxlib version
  and backend, so the interpreters' stages share the folder safely). No size limit:
  with one, jax scans the whole folder under a lock on every write, which costs more
  than it saves here; scripts/test.sh prunes entries unused for two weeks. An entry
  read while another process writes it is a warning and a recompile, never a wrong
  program. CATJAX_XLA_CACHE=0 turns it off; another value names the folder."""
  folder = os.environ.get("CATJAX_XLA_CACHE")
  if folder == "0":
    return
  if not folder:
    base = os.environ.get("CATJAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "catjax")
    folder = os.path.join(os.path.expanduser(base), "xla")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", folder)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_compilation_cache()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
  return jax.random.PRNGKey(0)


@pytest.fixture
def x64():
  """Run a test body with float64 enabled (fits then run in float64)."""
  with jax.enable_x64(True):
    yield

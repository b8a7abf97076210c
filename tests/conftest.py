import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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

"""Test setup: 8 forced host CPU devices, so sharding tests see a (2, 2, 2) mesh.

The flag must be set before jax initialises its backends. `load_config` is
the one way tests build an experiment config (import it: `from conftest
import load_config`).
"""

import importlib.util
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent XLA cache for each test process (pytest, or each xdist worker: two processes writing
# one cache could read each other's half-written entries), which the subprocesses of its tests
# inherit: a program the tiny configs share compiles once per process instead of once per test.
# The process's own directory, removed at its end (pytest_unconfigure).
_CACHE = tempfile.mkdtemp(prefix="rcfd_jax_tests_xla_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, overrides=None):
  """configs/NAME.py's get_config, with dotted-key overrides applied.

  name: a config file's stem, optionally with its argument as on the command
    line after the colon: "tiny", "tiny:/tmp/assets", "reproduce:sentiment,DIR".
  overrides: {"rl.objective": "max", "mesh.shape": (1, 1, 1), ...}, applied in
    order like --config.rl.objective=max. A key the config does not have
    raises (the config is locked while they are applied, as the command line
    locks it); the config comes back unlocked, as get_config returns it.
  """
  stem, sep, arg = name.partition(":")
  spec = importlib.util.spec_from_file_location(f"configs.{stem}", os.path.join(_REPO, "configs", f"{stem}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg if sep else None)
  if overrides:
    c.lock()
    c.update_from_flattened_dict(dict(overrides))
    c.unlock()
  return c


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
  """One directory of prepared tiny assets (corpus, width-32 GPT-2 policy and RM) per session."""
  from rcfd_jax.reproduce import prepare
  return prepare.build(tmp_path_factory.mktemp("tiny_assets"), n_reviews=400, width=32)


@pytest.fixture(scope="module")
def env():
  """Subprocess environment: the tests' precision, this checkout on the path, this process's XLA cache."""
  e = dict(os.environ)
  e.update(JAX_DEFAULT_MATMUL_PRECISION="highest",
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
           PYTHONPATH=f"{_REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  return e


def pytest_unconfigure(config):
  """Removes this process's XLA cache."""
  del config
  shutil.rmtree(_CACHE, ignore_errors=True)

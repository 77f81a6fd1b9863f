"""Test setup: 2 virtual CPU devices (multi-device paths), set before JAX loads."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dropjax  # noqa: E402,F401  (applies the CPU XLA defaults)
import jax  # noqa: E402
import pytest  # noqa: E402

REAL_DATA_DIR = os.environ.get("DROPJAX_DATA_DIR")


@pytest.fixture(scope="session")
def real_data_dir():
  if not REAL_DATA_DIR or not os.path.isdir(REAL_DATA_DIR):
    pytest.skip("real datasets not prepared: set DROPJAX_DATA_DIR after running "
                "`python ../shared/datasets/prepare.py .data`")
  return REAL_DATA_DIR


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.devices()}"

import os

# Keep TensorFlow's C++ start-up chatter out of the test log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy_and_fresh_names():
    """Every test starts and ends with the float32 policy and fresh names."""
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
    yield
    keras.config.set_dtype_policy("float32")


def pytest_collection_modifyitems(config, items):
    """Skips `tensorflow_only` tests on the other backends."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    skip = pytest.mark.skip(
        reason=f"TensorFlow-only test; the backend is {backend}."
    )
    for item in items:
        if "tensorflow_only" in item.keywords:
            item.add_marker(skip)

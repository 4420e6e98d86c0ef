import os

# Keep TensorFlow's C++ start-up chatter out of the test log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


def _split_cpu_in_two():
    """Two logical CPU devices for the `tf.distribute` tests.

    TensorFlow fixes its logical devices when it first initializes them, so
    this runs once, at import, before any test touches a device. Tests on one
    device never see the second one.
    """
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    if tf.config.get_logical_device_configuration(cpu):
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:
        # Devices already initialized (by a plugin, say): the distribution
        # tests then skip themselves.
        pass


_split_cpu_in_two()


def _exact_float32_matmuls():
    """float32 matrix products in full float32 on GPUs too.

    The tests compare with float64 NumPy references to about 1e-5. On
    NVIDIA GPUs JAX multiplies float32 matrices (and convolves) in TF32 by
    default, and cuDNN convolutions on PyTorch too, about 1e-3 off (seen on
    an H200: update_bn's means 8e-4 from the reference); on CPUs this
    changes nothing.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


_exact_float32_matmuls()


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

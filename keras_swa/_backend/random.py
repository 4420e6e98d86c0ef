"""Random draws laid out like the arrays they perturb."""

import keras
from keras import ops


def normal_like(value, seed):
    """Standard normal noise of the shape, dtype and layout of `value`.

    `keras.random.normal(ops.shape(value), dtype, seed)`, the same numbers,
    but on JAX, for an array sharded over several devices, drawn shard by
    shard inside a `jax.jit` with the array's sharding as its output
    sharding: no device ever holds the whole draw (JAX's partitionable
    threefry, the default since JAX 0.5, gives each device its shard's bits
    and the same numbers as an unsharded draw).

    Args:
        value: A tensor of the backend (a variable's `value`).
        seed: Integer seed, as for `keras.random.normal`.

    Returns:
        A tensor like `value`.
    """
    shape, dtype = ops.shape(value), value.dtype

    def draw():
        return keras.random.normal(shape, dtype=dtype, seed=seed)

    sharding = getattr(value, "sharding", None)
    if (
        keras.backend.backend() == "jax"
        and sharding is not None
        and len(sharding.device_set) > 1
    ):
        import jax

        return jax.jit(draw, out_shardings=sharding)()
    return draw()

"""Random draws laid out like the arrays they perturb."""

import functools

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
    shape, dtype = tuple(ops.shape(value)), value.dtype
    sharding = getattr(value, "sharding", None)
    if (
        keras.backend.backend() == "jax"
        and sharding is not None
        and len(sharding.device_set) > 1
    ):
        # The key Keras makes of an integer seed (`[seed, 0]`, uint32), as
        # an argument: the compiled draw is kept for every seed, where a
        # seed baked into the trace would compile it anew on each call
        # (0.18 s a variable on 8 host devices).
        key = ops.convert_to_tensor([seed, 0], dtype="uint32")
        return _sharded_draw(shape, dtype, sharding)(key)
    return keras.random.normal(shape, dtype=dtype, seed=seed)


@functools.lru_cache(maxsize=256)
def _sharded_draw(shape, dtype, sharding):
    import jax

    def draw(key):
        return keras.random.normal(shape, dtype=dtype, seed=key)

    return jax.jit(draw, out_shardings=sharding)

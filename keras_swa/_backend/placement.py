"""Where the state of an average lives: beside its weight, sharded like it,
or in host memory (`offload=True`), per backend.

- TensorFlow: offloaded state is created on the CPU device (`tf.device`) and
  each snapshot's arithmetic runs there, the weights copied to it.
- JAX: offloaded state lives in the pinned host memory of the weight's
  devices, sharded like the weight (`Sharding.with_memory_kind`); inside the
  compiled step each snapshot copies the weights to host memory and folds
  them in there (`compute_on("device_host")`), so the averages never enter
  accelerator memory.
- PyTorch: offloaded state is CPU tensors (`keras.device("cpu")`); each
  snapshot copies the weights to the CPU.
"""

import contextlib

import keras

from keras_swa._backend import variable_value

HOST_MEMORY = "pinned_host"


def check_offload(variables) -> None:
    """Raises where host offload cannot keep the state of `variables`.

    Under a `tf.distribute` strategy with several replicas each replica
    keeps its own copy of the state, on its own device: offload would put
    them all on one CPU and lose that. On JAX the devices must have pinned
    host memory.

    Args:
        variables: List of the variables to average.

    Raises:
        ValueError: naming `offload`.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.get_strategy()
        mirrored = [
            variable
            for variable in variables
            if isinstance(
                variable_value(variable), tf.distribute.DistributedValues
            )
        ]
        if strategy.num_replicas_in_sync > 1 or mirrored:
            raise ValueError(
                "`offload=True` is not supported under a tf.distribute "
                "strategy with several replicas: each replica keeps its own "
                "averages, on its own device. Leave `offload=False` there."
            )
    elif backend == "jax":
        for variable in variables:
            for device in variable_value(variable).sharding.device_set:
                kinds = {m.kind for m in device.addressable_memories()}
                if HOST_MEMORY not in kinds:
                    raise ValueError(
                        "`offload=True` needs pinned host memory, which the "
                        f"JAX device {device} lacks (it has {sorted(kinds)})."
                    )


@contextlib.contextmanager
def creation_scope(offload: bool):
    """The scope in which the state of an average is created.

    TensorFlow and PyTorch create offloaded state on the CPU; JAX places it
    by its layout (see `layout`).

    Args:
        offload: Whether the state goes to host memory.
    """
    if offload and keras.backend.backend() in ("tensorflow", "torch"):
        with keras.device("cpu:0"):
            yield
    else:
        yield


def layout(variable, offload: bool, ring: bool = False):
    """The layout of an average of `variable`, or of a ring of its
    snapshots (one leading axis more, not sharded).

    Each average takes its variable's layout, so that it is sharded like it:
    `_layout` is private, but it is what Keras' own
    `add_variable_from_reference` reads (no public accessor). On JAX an
    offloaded average takes the variable's sharding in host memory.

    Args:
        variable: The variable averaged.
        offload: Whether the state goes to host memory.
        ring: Whether the layout is that of a ring of snapshots. Defaults to
            `False`.

    Returns:
        A `keras.distribution.TensorLayout`, a JAX sharding, or `None`.
    """
    base = getattr(variable, "_layout", None)
    if keras.backend.backend() == "jax" and (offload or (ring and base)):
        sharding = _named(variable_value(variable).sharding)
        if ring:
            sharding = _with_leading_axis(sharding)
        if offload:
            sharding = sharding.with_memory_kind(HOST_MEMORY)
        return sharding
    if ring and isinstance(base, keras.distribution.TensorLayout):
        return keras.distribution.TensorLayout(
            (None,) + tuple(base.axes), base.device_mesh
        )
    return base


def _named(sharding):
    """`sharding` as a `NamedSharding`, the only kind Keras' JAX variables
    take as a layout (a weight on one device: a mesh of that device)."""
    import jax

    if isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        (device,) = sharding.device_set
        return jax.sharding.NamedSharding(
            jax.sharding.Mesh([device], ("device",)),
            jax.sharding.PartitionSpec(),
            memory_kind=sharding.memory_kind,
        )
    raise ValueError(
        "A window or `offload=True` needs the weights on one device or "
        "sharded with a `NamedSharding` (a `keras.distribution` layout); "
        f"got {type(sharding).__name__}."
    )


def _with_leading_axis(sharding):
    import jax

    return jax.sharding.NamedSharding(
        sharding.mesh,
        jax.sharding.PartitionSpec(None, *sharding.spec),
        memory_kind=sharding.memory_kind,
    )


def like(value, variable):
    """`value`, an average's value, placed where `variable` lives (an
    offloaded average goes back to the device to be copied into a weight or
    computed with it).

    Args:
        value: A tensor.
        variable: The variable `value` goes with.

    Returns:
        The tensor, on the devices (and in the memory) of `variable`.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        sharding = variable_value(variable).sharding
        if value.sharding != sharding:
            return jax.device_put(value, sharding)
    elif backend == "torch":
        return value.to(variable_value(variable).device)
    return value

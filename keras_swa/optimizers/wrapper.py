"""`WrappedOptimizer`: an optimizer that delegates its updates to an inner
optimizer, as Keras' `LossScaleOptimizer` does (its learning rate, its
`iterations`, loss scaling, weight decay, its saved variables)."""

import keras


class WrappedOptimizer(keras.optimizers.Optimizer):
    """An optimizer whose updates are those of `inner_optimizer`.

    The base of `keras_swa.AveragedOptimizer` (which builds the inner
    optimizer on the model's variables and adds what it does after each
    update) and of `keras_swa.ScheduleFree` (which builds it on its `z`s);
    this class only delegates, following
    `keras/src/optimizers/loss_scale_optimizer.py`: the wrapper's own
    learning rate is never used, its `learning_rate` and `iterations` are
    the inner optimizer's, its variables are its own followed by the inner
    optimizer's, and its config holds the inner optimizer.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` (checked by the
            subclass).
        name: String, the name of the optimizer. Defaults to `None`.
    """

    def __init__(self, inner_optimizer, name=None):
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from the inner optimizer's weight decay.

        As `keras.optimizers.Optimizer.exclude_from_weight_decay`: call it
        before the optimizer is built.
        """
        self.inner_optimizer.exclude_from_weight_decay(
            var_list=var_list, var_names=var_names
        )

    def _build_for_apply(self, trainable_variables):
        """Builds the optimizer on `trainable_variables` where `apply` comes
        first, as Keras' `apply` does; returns them (a list where it built).

        Raises:
            ValueError: if the optimizer is not built and no variables are
                given.
        """
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "The optimizer must be built before `apply` without "
                    "`trainable_variables`: call "
                    "`optimizer.build(trainable_variables)` first."
                )
            trainable_variables = list(trainable_variables)
            self.build(trainable_variables)
        return trainable_variables

    def finalize_variable_values(self, var_list):
        # Keras calls this at the end of `fit`: the inner optimizer's own
        # `use_ema` still applies.
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        # Not super().get_config(): the base arguments belong to the inner
        # optimizer.
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner_optimizer = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner_optimizer, **config)


def load_inner_only(wrapper, store) -> bool:
    """Loads a checkpoint of the bare inner optimizer into `wrapper`'s inner
    optimizer; returns whether `store` was one.

    A checkpoint of the same model trained with the bare inner optimizer
    holds only the inner optimizer's variables. Keras would skip them all
    with a warning (momentum lost, `iterations` back to 0, so an averager's
    `start_averaging` would count from the restart); they belong to the
    inner optimizer, and the wrapper's own state starts empty.
    """
    inner = wrapper.inner_optimizer
    inner_count = len(inner.variables)
    if not (
        wrapper.built
        and len(store.keys()) == inner_count
        and inner_count != len(wrapper.variables)
    ):
        return False
    inner.load_own_variables(store)
    # Keras' saving then visits the inner optimizer at a path of its own,
    # which such a checkpoint lacks: that one visit must not warn that it
    # skipped the state just loaded.
    load = inner.load_own_variables

    def skip_the_empty_visit(nested_store):
        del inner.load_own_variables
        if len(nested_store.keys()):
            load(nested_store)

    inner.load_own_variables = skip_the_empty_visit
    return True

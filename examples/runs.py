"""The training loop of `examples.train`: the runs of one seed.

Each run builds the model from the seed, trains it under its schedule with
its averager and returns its `history`, the test `probabilities` of its
rows, the accuracy of its raw weights with the running BatchNorm statistics
(`running_bn`) and, where it has them, `extra` results for metrics.json.
"""

import math
import os
import time

from examples import recipes
from examples import scoring


def build(config, dataset, optimizer, seed, metrics=()):
    """The model of `--model` for `dataset`, its initial weights drawn from
    `seed`, compiled with `optimizer`; with `--l2`, every trainable
    variable carries the coupled L2 penalty."""
    import keras

    from examples import models as models_lib

    keras.utils.set_random_seed(seed)
    model = models_lib.get(config["model"], dataset.input_shape, dataset.num_classes)
    if config["l2"]:
        add_coupled_l2(model, config["l2"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", *metrics],
    )
    return model


def add_coupled_l2(model, l2):
    """Adds `l2 / 2 * sum(w ** 2)` of every trainable variable `w` to the
    loss: `l2 * w` joins its gradient, and with it the momentum, as
    `torch.optim.SGD(weight_decay=l2)` does (Keras' `weight_decay` is
    decoupled: `w -= lr * weight_decay * w`, outside the momentum)."""
    import keras

    for variable in model.trainable_variables:
        variable.regularizer = keras.regularizers.L2(l2 / 2)


def sgd(config):
    """SGD with `--momentum` and the decoupled `--weight_decay`."""
    import keras

    return keras.optimizers.SGD(
        config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"] or None,
    )


def fit(model, dataset, config, schedule, extra_callbacks=()):
    """`model.fit` for `--epochs` under the per-epoch `schedule` (a
    `LearningRateScheduler` ahead of `extra_callbacks`; None: the
    optimizer's own rate); returns the history."""
    import keras

    callbacks = list(extra_callbacks)
    if schedule is not None:
        callbacks.insert(0, keras.callbacks.LearningRateScheduler(schedule))
    history = model.fit(
        # A pipeline of its own: every run sees the same order.
        dataset.train_pipeline(),
        epochs=config["epochs"],
        shuffle=False,  # the pipeline shuffles
        validation_data=dataset.test,
        callbacks=callbacks,
        verbose=config["verbose"],
    )
    return history.history


def last_epoch(history):
    """The last per-epoch evaluation of `fit` (running BatchNorm statistics)."""
    return {
        "accuracy": float(history["val_accuracy"][-1]),
        "loss": float(history["val_loss"][-1]),
    }


def ema(config):
    """`--ema_decay` and `--ema_warmup`'s EMA wrapper around `sgd`."""
    import keras_swa

    return keras_swa.EMA(sgd(config), decay=config["ema_decay"], warmup=config["ema_warmup"])


def run_plain(config, dataset, seed, with_ema):
    """Plain SGD under the plain schedule; with `with_ema`, under the EMA
    wrapper, which averages the same trajectory. Rows `sgd` (and `ema`)."""
    import keras_swa

    model = build(config, dataset, ema(config) if with_ema else sgd(config), seed)
    history = fit(model, dataset, config, recipes.plain_schedule(config))
    probabilities = {}
    if with_ema:
        with keras_swa.averaged_weights(model, bn_data=dataset.train_eval, verbose=0):
            probabilities["ema"] = scoring.test_probabilities(model, dataset)
    probabilities["sgd"] = scoring.evaluate_bn_recomputed(model, dataset)
    return {"history": history, "probabilities": probabilities,
            "running_bn": {"sgd": last_epoch(history)}}


def swa_callback(config, dataset, swa_start, with_swag, **arguments):
    """The SWA callback (`SWAG` with `with_swag`, which also keeps the
    posterior) averaging every epoch from `swa_start`, with BatchNorm
    recomputed on the training set and evaluated on the test set per
    epoch (the `val_swa_*` curves); `arguments` go to it too."""
    import keras_swa

    arguments.update(
        start_epoch=swa_start,
        bn_data=dataset.train_eval,
        validation_data=dataset.test,
        verbose=int(config["verbose"] == 1),
    )
    if with_swag:
        return keras_swa.SWAG(max_rank=config["swag_rank"], **arguments)
    return keras_swa.StochasticWeightAveraging(**arguments)


def keep_iterate():
    """A callback that keeps the weights of the last iterate when `fit`
    ends, in `final_weights`: before the SWA callback in the list, it sees
    them before the average replaces them."""
    import keras

    class KeepIterate(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            self.final_weights = self.model.get_weights()

    return KeepIterate()


def average_rows(config, dataset, model, averager, seed):
    """Rows `swa` and, for a SWAG `averager`, `swag` of a model that holds
    the SWA average after `fit` (with recomputed BatchNorm); and the SWAG
    numbers for metrics.json."""
    import keras
    import keras_swa

    probabilities = {"swa": scoring.test_probabilities(model, dataset)}
    if not isinstance(averager, keras_swa.SWAG):
        return probabilities, {}
    start = time.perf_counter()
    probabilities["swag"] = keras_swa.predict_bma(
        model,
        dataset.test,
        source=averager,
        num_samples=config["swag_samples"],
        scale=config["swag_scale"],
        seed=seed,
        bn_data=dataset.train_eval,
        bn_steps=config["swag_bn_batches"],
        from_logits=True,
    )
    seconds = time.perf_counter() - start
    samples = config["swag_samples"] if config["swag_scale"] > 0 else 1
    return probabilities, {"swag": {
        "rank": averager.rank,
        "n_averaged": int(keras.ops.convert_to_numpy(averager.n_averaged)),
        "samples": samples,
        "bma_seconds": seconds,
        "bma_seconds_per_sample": seconds / samples,
    }}


def run_swa(config, dataset, swa_start, seed, with_swag):
    """SGD under the SWA schedule with the SWA callback, or with SWAG (the
    SWA callback that also keeps the posterior). Rows `swa_iterate`, `swa`
    (and `swag`)."""
    anneal = config["swa_anneal_epochs"]
    # With an anneal, the callback takes the rate from the plain schedule
    # at `swa_start` to `--swa_lr`; without, the schedule gets there itself.
    rate = dict(swa_lr=config["swa_lr"], anneal_epochs=anneal) if anneal else {}
    averager = swa_callback(config, dataset, swa_start, with_swag, **rate)
    iterate = keep_iterate()
    model = build(config, dataset, sgd(config), seed)
    history = fit(model, dataset, config, recipes.swa_schedule(config, swa_start),
                  [iterate, averager])
    # The callback left the average, with recomputed BatchNorm, in the model.
    probabilities, extra = average_rows(config, dataset, model, averager, seed)
    model.set_weights(iterate.final_weights)
    probabilities["swa_iterate"] = scoring.evaluate_bn_recomputed(model, dataset)
    return {"history": history, "probabilities": probabilities, "extra": extra,
            "running_bn": {"swa_iterate": last_epoch(history)}}


def run_trajectory(config, dataset, swa_start, seed):
    """One SGD run under the plain schedule carrying every averager: the
    EMA wrapper, and the SWAG callback (SWA's average and SWAG's
    posterior) averaging every epoch from `swa_start` without touching the
    learning rate. Neither changes the trajectory, so every row averages
    the same weights: `sgd` (the final iterate), `swa`, `swag` and `ema`."""
    import keras_swa

    averager = swa_callback(config, dataset, swa_start, True, allow_averaging_optimizer=True)
    iterate = keep_iterate()
    model = build(config, dataset, ema(config), seed)
    history = fit(model, dataset, config, recipes.plain_schedule(config), [iterate, averager])
    probabilities, extra = average_rows(config, dataset, model, averager, seed)
    model.set_weights(iterate.final_weights)
    with keras_swa.averaged_weights(model, bn_data=dataset.train_eval, verbose=0):
        probabilities["ema"] = scoring.test_probabilities(model, dataset)
    probabilities["sgd"] = scoring.evaluate_bn_recomputed(model, dataset)
    return {"history": history, "probabilities": probabilities, "extra": extra,
            "running_bn": {"sgd": last_epoch(history)}}


def snapshot_every(total_updates, wanted):
    """The updates between two EMA snapshots for about `wanted` snapshots
    over `total_updates`: `total_updates / m` for the smallest divisor `m`
    of `total_updates` in [wanted, 2 * wanted], so that the last snapshot
    is the last update; `total_updates // wanted` if there is none."""
    wanted = min(wanted, total_updates)
    for count in range(wanted, min(2 * wanted, total_updates) + 1):
        if total_updates % count == 0:
            return total_updates // count
    return total_updates // wanted


def clear_snapshots(directory):
    """Removes the EMA snapshots (`ema-<step>.npz`) an earlier run of this
    binary left in `directory` (EMASnapshots refuses to mix runs); returns
    how many."""
    import re

    if not os.path.isdir(directory):
        return 0
    stale = [name for name in os.listdir(directory) if re.fullmatch(r"ema-\d+\.npz", name)]
    for name in stale:
        os.remove(os.path.join(directory, name))
    return len(stale)


def run_posthoc_ema(config, dataset, seed, directory):
    """Plain SGD under PostHocEMA with EMASnapshots writing to `directory`;
    after training, `sweep_ema` over `--ema_sweep`. Row `sgd` and the
    sweep, in `extra["posthoc_ema"]`."""
    import keras_swa

    updates = config["epochs"] * math.ceil(dataset.train_size / config["batch_size"])
    every = snapshot_every(updates, config["ema_snapshots"])
    removed = clear_snapshots(directory)
    if removed:
        print(f"Removed {removed} EMA snapshots of an earlier run from {directory}.")
    optimizer = keras_swa.PostHocEMA(sgd(config), sigma_rels=tuple(config["ema_sigma_rels"]))
    ece = keras_swa.metrics.ExpectedCalibrationError(num_bins=scoring.ECE_BINS, from_logits=True)
    model = build(config, dataset, optimizer, seed, metrics=[ece])
    history = fit(model, dataset, config, recipes.plain_schedule(config),
                  [keras_swa.EMASnapshots(directory, every_n_steps=every)])
    start = time.perf_counter()
    table = keras_swa.sweep_ema(model, directory, config["ema_sweep"], dataset.test,
                                bn_data=dataset.train_eval)
    seconds = time.perf_counter() - start
    sweep = [
        # The loss is the cross-entropy of the logits: the NLL.
        {"sigma_rel": row["sigma_rel"], "accuracy": float(row["accuracy"]),
         "nll": float(row["loss"]), "ece": float(row["ece"])}
        for row in table
    ]
    probabilities = {"sgd": scoring.evaluate_bn_recomputed(model, dataset)}
    extra = {"posthoc_ema": {
        "directory": directory,
        "every_n_steps": every,
        "updates": updates,
        "snapshots": updates // every,
        "sweep": sweep,
        "sweep_seconds": seconds,
    }}
    return {"history": history, "probabilities": probabilities, "extra": extra,
            "running_bn": {"sgd": last_epoch(history)}}


def schedule_free_optimizer(config, variant, steps_per_epoch):
    """The optimizer of a schedule-free run: `keras_swa.ScheduleFree` around
    SGD without momentum (`variant="sgd"`, `--sf_lr`) or AdamW with
    `beta_1=0` (`"adamw"`, `--sf_adamw_lr`), or Keras' own
    `ScheduleFreeAdamW` (`"keras"`, `--sf_adamw_lr`). All interpolate with
    `--sf_momentum`, warm up linearly over `--sf_warmup_epochs` and use
    the decoupled `--weight_decay`, then hold the rate: no schedule."""
    import keras

    import keras_swa

    lr = config["sf_lr"] if variant == "sgd" else config["sf_adamw_lr"]
    warmup = config["sf_warmup_epochs"] * steps_per_epoch
    decay, beta = config["weight_decay"], config["sf_momentum"]
    if variant == "keras":
        return keras.optimizers.ScheduleFreeAdamW(
            lr, beta_1=beta, warmup_steps=warmup, weight_decay=decay or None)
    # From 0 to `lr` over the warmup's updates, then `lr`.
    rate = keras.optimizers.schedules.PolynomialDecay(0.0, warmup, lr, power=1.0) if warmup else lr
    if variant == "sgd":
        inner = keras.optimizers.SGD(rate, momentum=0.0, weight_decay=decay or None)
    else:
        inner = keras.optimizers.AdamW(rate, beta_1=0.0, weight_decay=decay)
    return keras_swa.ScheduleFree(inner, momentum=beta)


def run_schedule_free(config, dataset, seed, variant, prefix):
    """A schedule-free run (`schedule_free_optimizer`'s `variant`): rows
    `<prefix>_y`, the weights it trains at (what Keras leaves in the
    model), and `<prefix>_x`, its average (`keras_swa.assign_average`);
    both with BatchNorm recomputed on the training set. `extra` says
    whether x was y (Keras' optimizer on a backend where keras_swa
    evaluates it at y: docs/schedule_free.md, "Keras defects")."""
    import numpy as np

    import keras_swa

    steps = math.ceil(dataset.train_size / config["batch_size"])
    model = build(config, dataset, schedule_free_optimizer(config, variant, steps), seed)
    if variant == "keras":
        # Keras' copy of the initial weights into its `momentum` slots is
        # lost when TensorFlow's `fit` builds the optimizer while tracing
        # (docs/schedule_free.md, "Keras defects"): build it eagerly.
        model.optimizer.build(model.trainable_variables)
    history = fit(model, dataset, config, None)
    probabilities = {f"{prefix}_y": scoring.evaluate_bn_recomputed(model, dataset)}
    y = [np.array(w) for w in model.trainable_weights]
    keras_swa.assign_average(model, source=model.optimizer, bn_data=dataset.train_eval,
                             verbose=0)
    probabilities[f"{prefix}_x"] = scoring.test_probabilities(model, dataset)
    x_is_y = all(np.array_equal(a, np.array(b)) for a, b in zip(y, model.trainable_weights))
    return {"history": history, "probabilities": probabilities,
            "running_bn": {f"{prefix}_y": last_epoch(history)},
            "extra": {f"{prefix}_x_is_y": x_is_y}}


# The kinds of run: title and function `(config, dataset, swa_start, seed,
# output_dir) -> run`.
RUN_KINDS = {
    "sgd": ("SGD", lambda c, d, a, s, o: run_plain(c, d, s, with_ema=False)),
    "sgd_ema": ("SGD + EMA", lambda c, d, a, s, o: run_plain(c, d, s, with_ema=True)),
    "swa": ("SGD + SWA callback", lambda c, d, a, s, o: run_swa(c, d, a, s, with_swag=False)),
    "swag": ("SGD + SWAG callback", lambda c, d, a, s, o: run_swa(c, d, a, s, with_swag=True)),
    "posthoc_ema": ("SGD + PostHocEMA", lambda c, d, a, s, o: run_posthoc_ema(
        c, d, s, os.path.join(o, "ema_snapshots", f"seed_{s}"))),
    "trajectory": ("SGD + EMA + SWAG callback, one trajectory",
                   lambda c, d, a, s, o: run_trajectory(c, d, a, s)),
    "schedule_free": ("ScheduleFree(SGD)", lambda c, d, a, s, o: run_schedule_free(
        c, d, s, "sgd", "sf")),
    "schedule_free_adamw": ("ScheduleFree(AdamW)", lambda c, d, a, s, o: run_schedule_free(
        c, d, s, "adamw", "sf_adamw")),
    "keras_schedule_free": ("Keras' ScheduleFreeAdamW", lambda c, d, a, s, o: run_schedule_free(
        c, d, s, "keras", "keras_sf")),
}
# The schedule-free kinds: no `--schedule`, their rate is constant after
# the warmup.
SCHEDULE_FREE_KINDS = ("schedule_free", "schedule_free_adamw", "keras_schedule_free")
# The runs each `--averaging` mode trains, in order: run name -> kind.
# `schedule_free` trains the plain SGD run too, the baseline of its table.
MODE_RUNS = {
    "compare": {"sgd": "sgd_ema", "swa": "swag"},
    "sgd": {"sgd": "sgd"},
    "ema": {"sgd": "sgd_ema"},
    "swa": {"swa": "swa"},
    "swag": {"swa": "swag"},
    "posthoc_ema": {"sgd": "posthoc_ema"},
    "trajectory": {"sgd": "trajectory"},
    "schedule_free": {"sgd": "sgd", "sf": "schedule_free", "sf_adamw": "schedule_free_adamw",
                      "keras_sf": "keras_schedule_free"},
}


def train_seed(config, dataset, labels, swa_start, seed, output_dir):
    """The runs of `--averaging` for one seed: their histories, and per row
    the test probabilities and scores."""
    runs, seconds = {}, {}
    for name, kind in MODE_RUNS[config["averaging"]].items():
        title, run = RUN_KINDS[kind]
        schedule = f"{config['schedule']} schedule"
        if kind in SCHEDULE_FREE_KINDS:
            schedule = f"no schedule ({config['sf_warmup_epochs']}-epoch warmup)"
        print(f"\n== seed {seed}: {title}, {config['model']} on "
              f"{config['dataset']}, {config['epochs']} epochs, {schedule} ==", flush=True)
        start = time.time()
        runs[name] = run(config, dataset, swa_start, seed, output_dir)
        seconds[name] = time.time() - start
    probabilities = {k: v for run in runs.values() for k, v in run["probabilities"].items()}
    probabilities = {k: probabilities[k] for k in scoring.LABELS if k in probabilities}
    running = {k: v for run in runs.values() for k, v in run["running_bn"].items()}
    extra = {k: v for run in runs.values() for k, v in run.get("extra", {}).items()}
    return {
        "final": {k: scoring.scores(p, labels) for k, p in probabilities.items()},
        "running_bn": running,
        "seconds": seconds,
        "runs": {name: {"history": run["history"]} for name, run in runs.items()},
        **extra,
        "probabilities": probabilities,
    }

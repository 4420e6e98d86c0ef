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
    import keras

    from examples import models as models_lib

    keras.utils.set_random_seed(seed)
    model = models_lib.get(config["model"], dataset.input_shape, dataset.num_classes)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", *metrics],
    )
    return model


def sgd(config):
    import keras

    return keras.optimizers.SGD(
        config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"] or None,
    )


def fit(model, dataset, config, schedule, extra_callbacks=()):
    import keras

    history = model.fit(
        # A pipeline of its own: every run sees the same order.
        dataset.train_pipeline(),
        epochs=config["epochs"],
        shuffle=False,  # the pipeline shuffles
        validation_data=dataset.test,
        callbacks=[keras.callbacks.LearningRateScheduler(schedule), *extra_callbacks],
        verbose=config["verbose"],
    )
    return history.history


def last_epoch(history):
    """The last per-epoch evaluation of `fit` (running BatchNorm statistics)."""
    return {
        "accuracy": float(history["val_accuracy"][-1]),
        "loss": float(history["val_loss"][-1]),
    }


def run_plain(config, dataset, schedule, seed, with_ema):
    """Plain SGD; with `with_ema`, under the EMA wrapper, which averages the
    same trajectory. Rows `sgd` (and `ema`)."""
    import keras_swa

    optimizer = sgd(config)
    if with_ema:
        optimizer = keras_swa.EMA(
            optimizer, decay=config["ema_decay"], warmup=config["ema_warmup"]
        )
    model = build(config, dataset, optimizer, seed)
    history = fit(model, dataset, config, schedule)
    probabilities = {}
    if with_ema:
        with keras_swa.averaged_weights(model, bn_data=dataset.train_eval, verbose=0):
            probabilities["ema"] = scoring.test_probabilities(model, dataset)
    probabilities["sgd"] = scoring.evaluate_bn_recomputed(model, dataset)
    return {"history": history, "probabilities": probabilities,
            "running_bn": {"sgd": last_epoch(history)}}


def run_swa(config, dataset, schedule, swa_start, seed, with_swag):
    """SGD with the SWA callback, or with SWAG (the SWA callback that also
    keeps the posterior). Rows `swa_iterate`, `swa` (and `swag`)."""
    import keras
    import keras_swa

    class KeepIterate(keras.callbacks.Callback):
        # Before the averager in the list, so it sees the final iterate
        # before the average replaces it.
        def on_train_end(self, logs=None):
            self.final_weights = self.model.get_weights()

    iterate = KeepIterate()
    averager_arguments = dict(
        start_epoch=swa_start,
        bn_data=dataset.train_eval,
        validation_data=dataset.test,
        verbose=int(config["verbose"] == 1),
    )
    if with_swag:
        averager = keras_swa.SWAG(max_rank=config["swag_rank"], **averager_arguments)
    else:
        averager = keras_swa.StochasticWeightAveraging(**averager_arguments)
    model = build(config, dataset, sgd(config), seed)
    history = fit(model, dataset, config, schedule, [iterate, averager])
    # The callback left the average, with recomputed BatchNorm, in the model.
    probabilities = {"swa": scoring.test_probabilities(model, dataset)}
    extra = {}
    if with_swag:
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
        extra["swag"] = {
            "rank": averager.rank,
            "n_averaged": int(keras.ops.convert_to_numpy(averager.n_averaged)),
            "samples": samples,
            "bma_seconds": seconds,
            "bma_seconds_per_sample": seconds / samples,
        }
    model.set_weights(iterate.final_weights)
    probabilities["swa_iterate"] = scoring.evaluate_bn_recomputed(model, dataset)
    return {"history": history, "probabilities": probabilities, "extra": extra,
            "running_bn": {"swa_iterate": last_epoch(history)}}


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


def run_posthoc_ema(config, dataset, schedule, seed, directory):
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
    history = fit(model, dataset, config, schedule,
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


RUN_TITLES = {
    "sgd": "SGD",
    "sgd_ema": "SGD + EMA",
    "swa": "SGD + SWA callback",
    "swag": "SGD + SWAG callback",
    "posthoc_ema": "SGD + PostHocEMA",
}


def train_seed(config, dataset, labels, swa_start, seed, output_dir):
    """The runs of `--averaging` for one seed: their histories, and per row
    the test probabilities and scores."""
    averaging = config["averaging"]
    # Run name -> kind of run.
    wanted = {
        "compare": {"sgd": "sgd_ema", "swa": "swag"},
        "sgd": {"sgd": "sgd"},
        "ema": {"sgd": "sgd_ema"},
        "swa": {"swa": "swa"},
        "swag": {"swa": "swag"},
        "posthoc_ema": {"sgd": "posthoc_ema"},
    }[averaging]
    runs, seconds = {}, {}
    for name, kind in wanted.items():
        print(f"\n== seed {seed}: {RUN_TITLES[kind]}, {config['model']} on "
              f"{config['dataset']}, {config['epochs']} epochs, {config['schedule']} "
              "schedule ==", flush=True)
        start = time.time()
        if kind in ("swa", "swag"):
            runs[name] = run_swa(config, dataset, recipes.swa_schedule(config, swa_start),
                                 swa_start, seed, with_swag=kind == "swag")
        elif kind == "posthoc_ema":
            directory = os.path.join(output_dir, "ema_snapshots", f"seed_{seed}")
            runs[name] = run_posthoc_ema(config, dataset, recipes.plain_schedule(config), seed,
                                         directory)
        else:
            runs[name] = run_plain(config, dataset, recipes.plain_schedule(config), seed,
                                   with_ema=kind == "sgd_ema")
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


r"""Trains an image classifier plainly and with weight averaging, same budget.

The recipe of the SWA paper (Izmailov et al., 2018):
  * plain (`sgd`): SGD whose learning rate stays at `--lr` for half of the
    budget, then decays linearly to 1% of it by 90% and stays there;
  * `swa`: the same until `--swa_start`, except that the rate decays to
    `--swa_lr` (reached at 90% of `--swa_start`), is held there, and the
    weights are averaged at the end of every epoch from `--swa_start` on by
    the `keras_swa.StochasticWeightAveraging` callback, with the BatchNorm
    statistics recomputed on the training set at the end;
  * `ema`: the plain schedule with the `keras_swa.EMA` optimizer wrapper.

`--averaging=compare` (the default) trains all three from the same initial
weights and seed, prints a table of test accuracy and loss (plain, final SWA
iterate, SWA average, EMA average) and writes `metrics.json` and
`curves.png` to `--output_dir`.

Examples:
  python -m examples.train                       # offline digits demo
  python -m examples.train --dataset=cifar100 --model=preresnet164 \
      --epochs=225 --lr=0.1 --swa_start=126 --swa_lr=0.05 \
      --weight_decay=3e-4 --batch_size=128 --data_dir=~/tensorflow_datasets
"""

import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402

import keras_swa  # noqa: E402
from examples import data as data_lib  # noqa: E402
from examples import models as models_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "digits", "'digits' (offline) or a tensorflow-datasets name.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data, or the IDX files of (fashion_)mnist.")
flags.DEFINE_bool("download", False, "Let tensorflow-datasets download a missing dataset.")
flags.DEFINE_enum("model", "small_cnn", list(models_lib.MODELS), "The network.")
flags.DEFINE_integer("epochs", 40, "Training budget in epochs, the same for every run.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_float("lr", 0.05, "Initial learning rate.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 5e-4, "Decoupled weight decay of SGD.")
flags.DEFINE_string("swa_start", "0.5", "First averaged epoch: an integer epoch, or a fraction of --epochs.")
flags.DEFINE_float("swa_lr", 0.01, "Learning rate of the SWA phase.")
flags.DEFINE_float("ema_decay", 0.998, "Decay of the EMA run.")
flags.DEFINE_enum("averaging", "compare", ["sgd", "swa", "ema", "compare"], "Which runs to train.")
flags.DEFINE_integer("seed", 0, "Seed of the initial weights, the data order and augmentation.")
flags.DEFINE_string("output_dir", "runs/latest", "Where metrics.json and curves.png go.")
flags.DEFINE_integer("verbose", 2, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")


def parse_swa_start(text, epochs):
    """`"12"` is epoch 12, `"0.75"` is 75% of `epochs`; returns the epoch."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"--swa_start must be an epoch or a fraction, got {text!r}."
            ) from None
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"--swa_start as a fraction must be in (0, 1], got {value}."
            )
        return min(int(math.floor(value * epochs)), epochs - 1)
    if not 0 <= value < epochs:
        raise ValueError(
            f"--swa_start must be an epoch in [0, {epochs - 1}] "
            f"(--epochs={epochs}), got {value}."
        )
    return value


def validate(config):
    """Raises `ValueError` for a flag out of range, naming the flag."""
    checks = [
        ("epochs", config["epochs"] >= 1, "an integer >= 1"),
        ("batch_size", config["batch_size"] >= 1, "an integer >= 1"),
        ("lr", config["lr"] > 0, "a float > 0"),
        ("swa_lr", config["swa_lr"] > 0, "a float > 0"),
        ("momentum", 0 <= config["momentum"] < 1, "a float in [0, 1)"),
        ("weight_decay", config["weight_decay"] >= 0, "a float >= 0"),
        ("ema_decay", 0 <= config["ema_decay"] < 1, "a float in [0, 1)"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"--{name} must be {expected}, got {config[name]}.")
    return parse_swa_start(str(config["swa_start"]), config["epochs"])


def paper_schedule(lr, epochs, final_ratio):
    """The SWA paper's per-epoch learning rate: `lr` for the first half of
    `epochs`, linear down to `lr * final_ratio` at 90%, then constant."""

    def schedule(epoch, current_lr=None):
        t = epoch / epochs
        if t <= 0.5:
            factor = 1.0
        elif t <= 0.9:
            factor = 1.0 - (1.0 - final_ratio) * (t - 0.5) / 0.4
        else:
            factor = final_ratio
        return lr * factor

    return schedule


def build(config, dataset, optimizer):
    keras.utils.set_random_seed(config["seed"])
    model = models_lib.get(config["model"], dataset.input_shape, dataset.num_classes)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def sgd(config):
    return keras.optimizers.SGD(
        config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"] or None,
    )


def fit(model, dataset, config, schedule, extra_callbacks=()):
    history = model.fit(
        dataset.train,
        epochs=config["epochs"],
        shuffle=False,  # the pipeline shuffles
        validation_data=dataset.test,
        callbacks=[keras.callbacks.LearningRateScheduler(schedule), *extra_callbacks],
        verbose=config["verbose"],
    )
    return history.history


def evaluate(model, dataset):
    loss, accuracy = model.evaluate(dataset.test, verbose=0)
    return {"accuracy": float(accuracy), "loss": float(loss)}


def run_sgd(config, dataset):
    model = build(config, dataset, sgd(config))
    history = fit(model, dataset, config, paper_schedule(config["lr"], config["epochs"], 0.01))
    return {"history": history, "final": {"sgd": evaluate(model, dataset)}}


def run_swa(config, dataset, swa_start):
    model = build(config, dataset, sgd(config))
    averager = keras_swa.StochasticWeightAveraging(
        start_epoch=swa_start,
        bn_data=dataset.train_eval,
        validation_data=dataset.test,
        verbose=int(config["verbose"] == 1),
    )
    schedule = paper_schedule(config["lr"], max(swa_start, 1), config["swa_lr"] / config["lr"])
    history = fit(model, dataset, config, schedule, [averager])
    final_iterate = {
        "accuracy": float(history["val_accuracy"][-1]),
        "loss": float(history["val_loss"][-1]),
    }
    # The callback left the average, with recomputed BatchNorm, in the model.
    return {
        "history": history,
        "swa_start": swa_start,
        "final": {"swa_iterate": final_iterate, "swa": evaluate(model, dataset)},
    }


def run_ema(config, dataset):
    optimizer = keras_swa.EMA(sgd(config), decay=config["ema_decay"])
    model = build(config, dataset, optimizer)
    history = fit(model, dataset, config, paper_schedule(config["lr"], config["epochs"], 0.01))
    with keras_swa.averaged_weights(model, bn_data=dataset.train_eval, verbose=0):
        averaged = evaluate(model, dataset)
    return {"history": history, "final": {"ema": averaged}}


LABELS = {
    "sgd": "SGD (plain)",
    "swa_iterate": "SWA: final iterate",
    "swa": "SWA: average",
    "ema": "EMA: average",
}


def format_table(final):
    lines = [
        f"| {'model':<20} | {'test accuracy':>13} | {'test loss':>9} |",
        f"|{'-' * 22}|{'-' * 15}|{'-' * 11}|",
    ]
    for key, label in LABELS.items():
        if key in final:
            row = final[key]
            lines.append(
                f"| {label:<20} | {row['accuracy'] * 100:12.2f}% | {row['loss']:9.4f} |"
            )
    return "\n".join(lines)


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in runs.items():
        accuracy = [a * 100 for a in run["history"]["val_accuracy"]]
        epochs = range(1, len(accuracy) + 1)
        label = "SWA run: iterate" if name == "swa" else LABELS[name].split(":")[0] + " iterate"
        ax.plot(epochs, accuracy, label=label)
        if name == "swa" and "val_swa_accuracy" in run["history"]:
            swa = [a * 100 for a in run["history"]["val_swa_accuracy"]]
            start = len(accuracy) - len(swa) + 1
            ax.plot(range(start, len(accuracy) + 1), swa, "o-", markersize=3,
                    label="SWA run: average (BN recomputed)")
        for key, marker in (("swa", "*"), ("ema", "D")):
            if key in run["final"]:
                ax.plot([len(accuracy)], [run["final"][key]["accuracy"] * 100], marker,
                        markersize=12, label=f"{LABELS[key]} (final)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Plain training vs. weight averaging, same budget")
    low = min(min(r["history"]["val_accuracy"][len(r["history"]["val_accuracy"]) // 4:])
              for r in runs.values()) * 100
    ax.set_ylim(max(low - 2, 0), 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(config):
    """Runs the requested trainings; returns the metrics written to disk."""
    swa_start = validate(config)
    dataset = data_lib.load(
        config["dataset"], config["batch_size"], config["data_dir"],
        config["seed"], config["download"],
    )
    wanted = ["sgd", "swa", "ema"] if config["averaging"] == "compare" else [config["averaging"]]
    runs, seconds = {}, {}
    for name in wanted:
        print(f"\n== {name} run: {config['model']} on {config['dataset']}, "
              f"{config['epochs']} epochs ==", flush=True)
        start = time.time()
        if name == "sgd":
            runs[name] = run_sgd(config, dataset)
        elif name == "swa":
            runs[name] = run_swa(config, dataset, swa_start)
        else:
            runs[name] = run_ema(config, dataset)
        seconds[name] = time.time() - start
    final = {k: v for run in runs.values() for k, v in run["final"].items()}
    table = format_table(final)
    print("\n" + table, flush=True)

    os.makedirs(config["output_dir"], exist_ok=True)
    metrics = {"config": config, "swa_start_epoch": swa_start, "seconds": seconds,
               "final": final, "runs": runs}
    with open(os.path.join(config["output_dir"], "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, default=float)
    plot(runs, os.path.join(config["output_dir"], "curves.png"))
    print(f"\nWrote metrics.json and curves.png to {config['output_dir']}")
    return metrics


def config_from_flags():
    names = ["dataset", "data_dir", "download", "model", "epochs", "batch_size", "lr",
             "momentum", "weight_decay", "swa_start", "swa_lr", "ema_decay",
             "averaging", "seed", "output_dir", "verbose"]
    return {name: FLAGS[name].value for name in names}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    try:
        validate(config)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    train(config)


if __name__ == "__main__":
    app.run(main)

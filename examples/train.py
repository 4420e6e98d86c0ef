r"""Trains an image classifier plainly and with weight averaging, same budget.

Two learning-rate recipes (`--schedule`), each for three kinds of run:

  `cosine` (the default; for any budget, short ones included):
    * plain (`sgd`): cosine annealing from `--lr` to 0 over `--epochs`;
    * `swa`: cosine annealing from `--lr` to `--swa_lr` over the epochs
      before `--swa_start` (default 75% of the budget), then `--swa_lr`,
      constant (the recipe of PyTorch's `torch.optim.swa_utils`:
      `CosineAnnealingLR`, then `SWALR`);
    * `ema`: the plain schedule, with the `keras_swa.EMA` wrapper.
  `paper` (the SWA paper, Izmailov et al., 2018, tuned for 150-225 epochs):
    * plain: `--lr` for half of the budget, then linear decay to 1% of it
      by 90% of the budget, then constant;
    * `swa`: the same shape squeezed into the epochs before `--swa_start`
      (default 50% of the budget), decaying to `--swa_lr` instead of 1%,
      then `--swa_lr`, constant;
    * `ema`: the plain schedule, with the `keras_swa.EMA` wrapper.

In the SWA run the `keras_swa.StochasticWeightAveraging` callback averages
the weights at the end of every epoch from `--swa_start` on. The EMA
wrapper does not change the trajectory of the weights it averages, so plain
SGD and EMA are one run: its raw weights are the plain row, its average the
EMA row (so `--averaging=ema` reports both rows, as `--averaging=swa`
reports the SWA average and its final iterate).

`--averaging=compare` (the default) trains the plain/EMA run and the SWA
run from the same initial weights and seed, for each seed of `--seeds`, and
prints a table of test accuracy and loss (plain, final SWA iterate, SWA
average, EMA average; mean +- standard deviation over the seeds) with one
sentence on whether the differences exceed the seed-to-seed spread. Every
row is evaluated with its BatchNorm statistics recomputed on the training
set (`keras_swa.update_bn`), so that the rows compare like with like at any
budget. It writes `metrics.json` and `curves.png` to `--output_dir`.

Examples:
  python -m examples.train                       # offline digits demo
  python -m examples.train --epochs=10 --seeds=0,1,2
  python -m examples.train --dataset=cifar100 --model=preresnet164 \
      --schedule=paper --epochs=225 --lr=0.1 --swa_start=126 --swa_lr=0.05 \
      --weight_decay=3e-4 --batch_size=128 --data_dir=~/tensorflow_datasets

From another folder than the checkout's root, run the file itself:
  python path/to/checkout/examples/train.py --epochs=10
"""

import dataclasses
import json
import math
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a file: python path/to/examples/train.py
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from examples import _cli  # noqa: E402
from examples import data as data_lib  # noqa: E402

# Keras, TensorFlow and keras_swa are imported where they are used, after
# the flags and the data are checked: a mistake is told in a second, in one
# line, instead of after their start-up and its log lines.

PROG = "examples.train"
# The keys of `models.MODELS` (a test keeps them in step), here so that the
# flags are checked without importing Keras.
MODEL_NAMES = ("small_cnn", "vgg16_bn", "preresnet110", "preresnet164", "wrn28_10")
SCHEDULES = ("cosine", "paper")
AVERAGING = ("compare", "sgd", "swa", "ema")

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "digits", "'digits' (offline) or a tensorflow-datasets name.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data, or the IDX files of (fashion_)mnist.")
flags.DEFINE_bool("download", False, "Let tensorflow-datasets download a missing dataset.")
flags.DEFINE_enum("model", "small_cnn", MODEL_NAMES, "The network.")
flags.DEFINE_integer("epochs", 40, "Training budget in epochs, the same for every run.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_enum("schedule", "cosine", SCHEDULES,
                  "Learning-rate recipe: 'cosine' (any budget) or 'paper' (the SWA paper's, "
                  "for 150-225-epoch budgets). See the module docstring.")
flags.DEFINE_float("lr", 0.05, "Initial learning rate.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 5e-4, "Decoupled weight decay of SGD.")
flags.DEFINE_string("swa_start", None,
                    "First averaged epoch: an integer epoch, or a fraction of --epochs. "
                    "Default: 0.75 with --schedule=cosine, 0.5 with --schedule=paper.")
flags.DEFINE_float("swa_lr", 0.01, "Learning rate of the SWA phase.")
flags.DEFINE_float("ema_decay", 0.998, "Decay of the EMA average.")
flags.DEFINE_bool("ema_warmup", True,
                  "Ramp the EMA decay up as min(decay, (1 + n) / (10 + n)), so that the "
                  "initial weights do not linger in short runs.")
flags.DEFINE_enum("averaging", "compare", AVERAGING,
                  "Which runs to train: 'compare' (all), 'sgd', 'swa' or 'ema'.")
flags.DEFINE_list("seeds", ["0"],
                  "Comma-separated seeds (initial weights, data order, augmentation); "
                  "with several, the table gives mean +- standard deviation.")
flags.DEFINE_string("output_dir", "runs/latest", "Where metrics.json and curves.png go.")
flags.DEFINE_integer("verbose", 2, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")

CONFIG_KEYS = ("dataset", "data_dir", "download", "model", "epochs", "batch_size",
               "schedule", "lr", "momentum", "weight_decay", "swa_start", "swa_lr",
               "ema_decay", "ema_warmup", "averaging", "seeds", "output_dir", "verbose")
# Defaults of the keys a caller of `train` may leave out.
DEFAULTS = {"schedule": "cosine", "ema_warmup": True, "seeds": [0], "swa_start": None}
# The default `--swa_start` of each schedule. Cosine: measured on digits at
# 10 and 20 epochs (docs/examples.md), 0.75 beats 0.5 (the SWA run anneals
# over more epochs before averaging); paper: about the paper's 126 of 225.
SWA_START = {"cosine": "0.75", "paper": "0.5"}


# --- Flags ------------------------------------------------------------------


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


def parse_seeds(seeds):
    """The seeds of `--seeds` (a list of ints or of their strings) as ints."""
    if isinstance(seeds, (int, str)):
        seeds = [seeds]
    try:
        values = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ValueError(
            f"--seeds must be integers >= 0 separated by commas, got "
            f"{','.join(map(str, seeds))!r}."
        ) from None
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise ValueError(
            f"--seeds must be distinct integers >= 0 separated by commas "
            f"(e.g. 0,1,2), got {','.join(map(str, seeds))!r}."
        )
    return values


def validate(config):
    """Checks the settings; returns the SWA start epoch and the seeds.

    Raises:
        ValueError: for a setting out of range, naming its flag.
    """
    checks = [
        ("epochs", config["epochs"] >= 1, "an integer >= 1"),
        ("batch_size", config["batch_size"] >= 1, "an integer >= 1"),
        ("lr", config["lr"] > 0, "a float > 0"),
        ("swa_lr", config["swa_lr"] > 0, "a float > 0"),
        ("momentum", 0 <= config["momentum"] < 1, "a float in [0, 1)"),
        ("weight_decay", config["weight_decay"] >= 0, "a float >= 0"),
        ("ema_decay", 0 <= config["ema_decay"] < 1, "a float in [0, 1)"),
        ("verbose", config["verbose"] in (0, 1, 2), "0, 1 or 2"),
        ("schedule", config["schedule"] in SCHEDULES, " or ".join(SCHEDULES)),
        ("averaging", config["averaging"] in AVERAGING, ", ".join(AVERAGING)),
        ("model", config["model"] in MODEL_NAMES, "one of " + ", ".join(MODEL_NAMES)),
        ("dataset", bool(config["dataset"]), "a dataset name"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"--{name} must be {expected}, got {config[name]!r}.")
    swa_start = config["swa_start"]
    if swa_start is None:
        swa_start = SWA_START[config["schedule"]]
    return parse_swa_start(str(swa_start), config["epochs"]), parse_seeds(config["seeds"])


# --- Learning-rate schedules (per epoch, 0-based) -----------------------------


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


def cosine_schedule(lr, epochs, final_lr=0.0):
    """Cosine annealing from `lr` at epoch 0 towards `final_lr` at epoch
    `epochs`, `final_lr` from then on: `torch.optim.lr_scheduler.
    CosineAnnealingLR(T_max=epochs, eta_min=final_lr)` stepped per epoch."""

    def schedule(epoch, current_lr=None):
        if epoch >= epochs:
            return final_lr
        return final_lr + (lr - final_lr) * (1 + math.cos(math.pi * epoch / epochs)) / 2

    return schedule


def schedules(config, swa_start):
    """The per-epoch learning rates `(plain, swa)` of `--schedule`; the EMA
    run uses the plain one."""
    lr, epochs, swa_lr = config["lr"], config["epochs"], config["swa_lr"]
    if config["schedule"] == "paper":
        return (
            paper_schedule(lr, epochs, 0.01),
            paper_schedule(lr, max(swa_start, 1), swa_lr / lr),
        )
    return cosine_schedule(lr, epochs), cosine_schedule(lr, swa_start, swa_lr)


# --- Training -----------------------------------------------------------------


def build(config, dataset, optimizer, seed):
    import keras

    from examples import models as models_lib

    keras.utils.set_random_seed(seed)
    model = models_lib.get(config["model"], dataset.input_shape, dataset.num_classes)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
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


def evaluate_bn_recomputed(model, dataset):
    """Recomputes the model's BatchNorm statistics on the training set, then
    evaluates: the evaluation every row of the table gets."""
    import keras_swa

    keras_swa.update_bn(model, dataset.train_eval, verbose=0)
    return evaluate(model, dataset)


def last_epoch(history):
    """The last per-epoch evaluation of `fit` (running BatchNorm statistics)."""
    return {
        "accuracy": float(history["val_accuracy"][-1]),
        "loss": float(history["val_loss"][-1]),
    }


def run_plain(config, dataset, schedule, seed, with_ema):
    """Plain SGD; with `with_ema`, under the EMA wrapper, which averages the
    same trajectory. Returns rows `sgd` (and `ema`)."""
    import keras_swa

    optimizer = sgd(config)
    if with_ema:
        optimizer = keras_swa.EMA(
            optimizer, decay=config["ema_decay"], warmup=config["ema_warmup"]
        )
    model = build(config, dataset, optimizer, seed)
    history = fit(model, dataset, config, schedule)
    final = {}
    if with_ema:
        with keras_swa.averaged_weights(model, bn_data=dataset.train_eval, verbose=0):
            final["ema"] = evaluate(model, dataset)
    final["sgd"] = evaluate_bn_recomputed(model, dataset)
    return {"history": history, "final": final, "running_bn": {"sgd": last_epoch(history)}}


def run_swa(config, dataset, schedule, swa_start, seed):
    """SGD with the SWA callback. Returns rows `swa_iterate` and `swa`."""
    import keras
    import keras_swa

    class KeepIterate(keras.callbacks.Callback):
        # Before the averager in the list, so it sees the final iterate
        # before the average replaces it.
        def on_train_end(self, logs=None):
            self.final_weights = self.model.get_weights()

    iterate = KeepIterate()
    averager = keras_swa.StochasticWeightAveraging(
        start_epoch=swa_start,
        bn_data=dataset.train_eval,
        validation_data=dataset.test,
        verbose=int(config["verbose"] == 1),
    )
    model = build(config, dataset, sgd(config), seed)
    history = fit(model, dataset, config, schedule, [iterate, averager])
    # The callback left the average, with recomputed BatchNorm, in the model.
    final = {"swa": evaluate(model, dataset)}
    model.set_weights(iterate.final_weights)
    final["swa_iterate"] = evaluate_bn_recomputed(model, dataset)
    return {
        "history": history,
        "final": final,
        "running_bn": {"swa_iterate": last_epoch(history)},
    }


def train_seed(config, dataset, swa_start, seed):
    """The runs of `--averaging` for one seed."""
    plain_schedule, swa_schedule = schedules(config, swa_start)
    averaging = config["averaging"]
    with_ema = averaging in ("compare", "ema")
    wanted = {"compare": ["sgd", "swa"], "swa": ["swa"]}.get(averaging, ["sgd"])
    runs, seconds = {}, {}
    for name in wanted:
        kind = "SGD + SWA callback" if name == "swa" else ("SGD + EMA" if with_ema else "SGD")
        print(f"\n== seed {seed}: {kind}, {config['model']} on {config['dataset']}, "
              f"{config['epochs']} epochs, {config['schedule']} schedule ==", flush=True)
        start = time.time()
        if name == "swa":
            runs[name] = run_swa(config, dataset, swa_schedule, swa_start, seed)
        else:
            runs[name] = run_plain(config, dataset, plain_schedule, seed, with_ema)
        seconds[name] = time.time() - start
    final = {k: v for run in runs.values() for k, v in run["final"].items()}
    running = {k: v for run in runs.values() for k, v in run["running_bn"].items()}
    return {
        "final": {k: final[k] for k in LABELS if k in final},
        "running_bn": running,
        "seconds": seconds,
        "runs": {name: {"history": run["history"]} for name, run in runs.items()},
    }


# --- Summary over seeds -------------------------------------------------------

LABELS = {
    "sgd": "SGD (plain)",
    "swa_iterate": "SWA: final iterate",
    "swa": "SWA: average",
    "ema": "EMA: average",
}


def summarize(finals):
    """Mean and sample standard deviation (None for one seed) of each row
    over the per-seed results `finals` (a list of `{row: {"accuracy",
    "loss"}}`), with the per-seed values."""
    summary = {}
    for row in finals[0]:
        summary[row] = {}
        for metric in ("accuracy", "loss"):
            values = [float(f[row][metric]) for f in finals]
            summary[row][metric] = statistics.fmean(values)
            summary[row][f"{metric}_std"] = (
                statistics.stdev(values) if len(values) > 1 else None
            )
            summary[row][f"{metric}_per_seed"] = values
    return summary


def _accuracy_cell(row):
    if row["accuracy_std"] is None:
        return f"{row['accuracy'] * 100:.2f}%"
    return f"{row['accuracy'] * 100:.2f} ± {row['accuracy_std'] * 100:.2f}%"


def _loss_cell(row):
    if row["loss_std"] is None:
        return f"{row['loss']:.4f}"
    return f"{row['loss']:.4f} ± {row['loss_std']:.4f}"


def format_table(summary):
    """The Markdown table of `summarize`'s rows."""
    lines = [
        f"| {'model':<20} | {'test accuracy':>16} | {'test loss':>17} |",
        f"|{'-' * 22}|{'-' * 18}|{'-' * 19}|",
    ]
    for key, label in LABELS.items():
        if key in summary:
            row = summary[key]
            lines.append(f"| {label:<20} | {_accuracy_cell(row):>16} | {_loss_cell(row):>17} |")
    return "\n".join(lines)


def _join(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def conclusion(summary, resolution=0.0):
    """One sentence: whether each row's test accuracy differs from the
    baseline's (plain SGD; else the SWA final iterate) by more than the
    seed-to-seed spread: the larger standard deviation of the two rows, and
    at least `resolution` (one test example, as a fraction: on a small test
    set a one-example difference is the smallest there is).

    A rough screen, not a significance test: with three seeds only a large
    difference is worth reading.
    """
    base = "sgd" if "sgd" in summary else ("swa_iterate" if "swa_iterate" in summary else None)
    others = [k for k in LABELS if k in summary and k != base]
    if base is None or not others:
        return "One row only: nothing to compare (--averaging=compare trains them all)."
    n = len(summary[base]["accuracy_per_seed"])
    diffs = {k: (summary[k]["accuracy"] - summary[base]["accuracy"]) * 100 for k in others}
    listed = [f"{LABELS[k]} {diffs[k]:+.2f} points" for k in others]
    if n == 1:
        return (
            f"One seed, so no spread to hold the differences against "
            f"({_join(listed)} against {LABELS[base]}): rerun with --seeds=0,1,2 "
            f"before reading anything into them."
        )
    spread = {
        k: max(summary[k]["accuracy_std"], summary[base]["accuracy_std"], resolution) * 100
        for k in others
    }
    # The accuracies are float32 metrics: ties within 1e-4 points are ties.
    above = [k for k in others if abs(diffs[k]) > spread[k] + 1e-4]
    within = [k for k in others if k not in above]
    rule = "the larger standard deviation of the two rows"
    if resolution:
        rule += f", at least one test example, {resolution * 100:.2f} points"

    def items(keys):
        return [f"{LABELS[k]} ({diffs[k]:+.2f} points, spread {spread[k]:.2f})" for k in keys]

    if not above:
        return (
            f"Over {n} seeds, no row differs from {LABELS[base]} by more than the "
            f"seed-to-seed spread ({rule}): {_join(items(within))}."
        )
    if not within:
        return (
            f"Over {n} seeds, every row differs from {LABELS[base]} by more than "
            f"the seed-to-seed spread ({rule}): {_join(items(above))}."
        )
    verb = "differs" if len(above) == 1 else "differ"
    return (
        f"Over {n} seeds, {_join(items(above))} {verb} from {LABELS[base]} by "
        f"more than the seed-to-seed spread ({rule}); {_join(items(within))} "
        f"{'does' if len(within) == 1 else 'do'} not."
    )


def running_bn_note(summary, running):
    """A note for the rows whose accuracy with the running BatchNorm
    statistics (what `model.evaluate` right after `fit` gives) is more than
    a point away from the table's (statistics recomputed); or None."""
    far = [
        f"{LABELS[k]} {running[k]['accuracy'] * 100:.2f}% (table: "
        f"{summary[k]['accuracy'] * 100:.2f}%)"
        for k in LABELS
        if k in running and abs(running[k]["accuracy"] - summary[k]["accuracy"]) > 0.01
    ]
    if not far:
        return None
    return (
        f"Note: with the running BatchNorm statistics training left (what "
        f"model.evaluate right after fit sees), {_join(far)}: at this budget "
        f"those statistics have not caught up with the weights, so the table "
        f"recomputes them for every row."
    )


# --- Plot ---------------------------------------------------------------------


def _band(ax, curves, start, label, **style):
    """Mean curve over seeds, with the min-max band when several."""
    import numpy as np

    values = np.array(curves) * 100
    epochs = np.arange(start, start + values.shape[1])
    (line,) = ax.plot(epochs, values.mean(axis=0), label=label, **style)
    if len(values) > 1:
        ax.fill_between(epochs, values.min(axis=0), values.max(axis=0),
                        color=line.get_color(), alpha=0.15, linewidth=0)
    return line


def figure(per_seed, summary, title):
    """The test-accuracy curves of the runs (mean over the seeds, with the
    min-max band) and the final rows; the legend sits outside the axes, so
    that it covers no curve. Returns the Matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    seeds = list(per_seed)
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    lowest = []
    first = per_seed[seeds[0]]["runs"]
    for name in first:
        curves = [per_seed[s]["runs"][name]["history"]["val_accuracy"] for s in seeds]
        label = "SWA run: iterate" if name == "swa" else "SGD run: iterate"
        _band(ax, curves, 1, label)
        lowest.append(min(min(c[len(c) // 4:]) for c in curves))
        history = first[name]["history"]
        if name == "swa" and "val_swa_accuracy" in history:
            swa = [per_seed[s]["runs"][name]["history"]["val_swa_accuracy"] for s in seeds]
            start = len(history["val_accuracy"]) - len(swa[0]) + 1
            _band(ax, swa, start, "SWA run: average (BN recomputed)", marker="o", markersize=3)
    epochs = len(first[next(iter(first))]["history"]["val_accuracy"])
    markers = {"sgd": "s", "swa_iterate": "^", "swa": "*", "ema": "D"}
    for i, key in enumerate(k for k in markers if k in summary):
        # Side by side after the last epoch, so that equal results stay visible.
        x = epochs + 0.5 + i * max(epochs, 4) / 40
        ax.plot([x], [summary[key]["accuracy"] * 100], markers[key], markersize=9,
                linestyle="none", label=f"{LABELS[key]} (final, BN recomputed)")
        lowest.append(summary[key]["accuracy"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    band = ", band: min to max over seeds" if len(seeds) > 1 else ""
    ax.set_title(f"{title}\ncurves: running BN statistics, mean over seeds{band}", fontsize=10)
    ax.set_ylim(max(min(lowest) * 100 - 2, 0), 100.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small",
              borderaxespad=0.0)
    return fig


def plot(per_seed, summary, path, title):
    """Writes `figure(...)` as a PNG to `path`."""
    import matplotlib.pyplot as plt

    fig = figure(per_seed, summary, title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --- The binary ---------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """What `prepare` checked and loaded, before any training."""

    config: dict
    swa_start: int
    seeds: list
    arrays: data_lib.Arrays
    output_dir: str


def prepare(config):
    """Checks the settings and the output folder and reads the data.

    Raises:
        ValueError: naming the flag, file or folder that is wrong, and what
            to do (`data.DataError`, `_cli.UsageError` included).
    """
    config = {**DEFAULTS, **config}
    swa_start, seeds = validate(config)
    output_dir = _cli.check_output_dir(config["output_dir"])
    arrays = data_lib.read(config["dataset"], config["data_dir"], config["download"])
    return Plan({**config, "seeds": seeds}, swa_start, seeds, arrays, output_dir)


def describe(plan):
    config, seeds = plan.config, plan.seeds
    over = (f"mean ± standard deviation over seeds {', '.join(map(str, seeds))}"
            if len(seeds) > 1 else f"seed {seeds[0]}")
    return (
        f"{config['model']} on {config['dataset']} ({len(plan.arrays.x_test)} test "
        f"images), {config['epochs']} epochs, {config['schedule']} schedule, SWA from "
        f"epoch {plan.swa_start}; {over}. Every row is evaluated with its BatchNorm "
        f"statistics recomputed on the training set (keras_swa.update_bn)."
    )


def run(plan):
    """Trains what `plan` asks; prints the table; writes `metrics.json` and
    `curves.png`. Returns the metrics."""
    config = plan.config
    per_seed = {}
    for seed in plan.seeds:
        dataset = data_lib.pipelines(config["dataset"], plan.arrays, config["batch_size"], seed)
        per_seed[seed] = train_seed(config, dataset, plan.swa_start, seed)
    summary = summarize([per_seed[s]["final"] for s in plan.seeds])
    running = {k: {"accuracy": statistics.fmean(per_seed[s]["running_bn"][k]["accuracy"]
                                                for s in plan.seeds)}
               for k in per_seed[plan.seeds[0]]["running_bn"]}
    header = describe(plan)
    table = format_table(summary)
    sentence = conclusion(summary, 1 / len(plan.arrays.x_test))
    note = running_bn_note(summary, running)
    print("\n" + header + "\n\n" + table + "\n\n" + sentence
          + (f"\n\n{note}" if note else ""), flush=True)

    metrics = {
        "config": config,
        "seeds": plan.seeds,
        "swa_start_epoch": plan.swa_start,
        "evaluation": header,
        "final": summary,
        "conclusion": sentence,
        "running_bn_note": note,
        "per_seed": {str(s): per_seed[s] for s in plan.seeds},
    }
    with open(os.path.join(plan.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, default=float)
    title = (f"{config['model']} on {config['dataset']}, {config['epochs']} epochs, "
             f"{config['schedule']} schedule")
    plot(per_seed, summary, os.path.join(plan.output_dir, "curves.png"), title)
    print(f"\nWrote metrics.json and curves.png to {plan.output_dir}")
    return metrics


def train(config):
    """`run(prepare(config))`: checks, then trains; returns the metrics."""
    return run(prepare(config))


def main(argv):
    del argv  # checked by _cli.run
    config = {name: FLAGS[name].value for name in CONFIG_KEYS}
    try:
        plan = prepare(config)
    except ValueError as e:
        raise _cli.UsageError(str(e)) from None
    run(plan)


if __name__ == "__main__":
    _cli.run(main, PROG)

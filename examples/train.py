r"""Trains an image classifier plainly and with weight averaging, same budget.

Recipes (`--recipe`), settings fixed in advance (flags given beside one
override its values; docs/results.md has what each measured):

  `demo` (`make demo`): every averager on one SGD run of digits at a
    constant learning rate with 20% of the training labels replaced by
    another class, where averaging is known to matter; the table gives the
    paired difference of each average to the SGD iterate with its 95%
    interval.
  `paper`: the SWA recipe as `torch.optim.swa_utils` runs it: SGD with
    momentum 0.9 and coupled L2 5e-4 (torch's `weight_decay`), cosine over
    12 epochs cut at 75%, where SWA starts, annealing to 0.01 over one
    epoch; plain SGD and EMA follow the whole cosine. For
    `--dataset=fashion_mnist --data_dir=DIR` (the four IDX files) or any
    tensorflow-datasets image set.

Learning-rate schedules (`--schedule`), each for three kinds of run:

  `cosine` (the default; for any budget, short ones included):
    * plain (`sgd`): cosine annealing from `--lr` to 0 over `--epochs`;
    * `swa`: cosine annealing from `--lr` to `--swa_lr` over the epochs
      before `--swa_start` (default 75% of the budget), then `--swa_lr`,
      constant;
    * `ema`: the plain schedule, with the `keras_swa.EMA` wrapper.
  `paper` (the SWA paper, Izmailov et al., 2018, tuned for 150-225 epochs):
    * plain: `--lr` for half of the budget, then linear decay to 1% of it
      by 90% of the budget, then constant;
    * `swa`: the same shape squeezed into the epochs before `--swa_start`
      (default 50% of the budget), decaying to `--swa_lr` instead of 1%,
      then `--swa_lr`, constant;
    * `ema`: the plain schedule, with the `keras_swa.EMA` wrapper.
  `constant`: `--lr` throughout; the SWA run switches to `--swa_lr` at
    `--swa_start` (default 50%).
With `--swa_anneal_epochs=N > 0` the SWA run follows the plain schedule
instead, and from `--swa_start` on the SWA callback anneals from there to
`--swa_lr` over N epochs (PyTorch's `CosineAnnealingLR`, then `SWALR`).
`--l2` adds coupled L2 (through the momentum, as PyTorch's SGD
`weight_decay`) to every parameter, beside Keras' decoupled
`--weight_decay`; `--label_noise` replaces that share of the training
labels by other classes, drawn per seed.

In the SWA run the `keras_swa.StochasticWeightAveraging` callback averages
the weights at the end of every epoch from `--swa_start` on; with
`--averaging=swag` or `compare` it is `keras_swa.SWAG`, the same callback
that also keeps the second moment and the last `--swag_rank` deviations, so
the same run gives the SWA average and the SWAG posterior. The SWAG-BMA
row is `keras_swa.predict_bma` over the test set: the mean probabilities of
`--swag_samples` weight samples (covariance scaled by `--swag_scale`), each
with its BatchNorm statistics recomputed on `--swag_bn_batches` training
batches. The EMA wrapper does not change the trajectory of the weights it
averages, so plain SGD and EMA are one run: its raw weights are the SGD
iterate row, its average the EMA row (so `--averaging=ema` reports both
rows, as `--averaging=swa` reports the SWA average and its final iterate).

`--averaging=compare` (the default) trains the plain/EMA run and the
SWA/SWAG run from the same initial weights, data order and seed, for each
seed of `--seeds`, and prints a table of test accuracy, NLL and expected
calibration error (SGD iterate, SWA run's iterate, SWA average, SWAG-BMA,
EMA average; mean +- standard deviation over the seeds), then each row's
paired difference to the SGD iterate (seed by seed) with its 95%
t-interval and verdict ("better", "worse" or "no significant difference").
`--averaging=trajectory` trains one plain run that carries the EMA wrapper
and the SWAG callback (which leaves the learning rate alone): rows SGD
iterate, SWA, SWAG-BMA and EMA of the same weights. Every row is evaluated
with its BatchNorm statistics recomputed on the training set
(`keras_swa.update_bn`), so that the rows compare like with like at any
budget. It writes `metrics.json`, `predictions.npz` (every row's test
probabilities), `curves.png` and `calibration.png` (a reliability diagram)
to `--output_dir`.

`--averaging=posthoc_ema` trains the plain run once under
`keras_swa.PostHocEMA` (the power-function EMAs of `--ema_sigma_rels`),
with `keras_swa.EMASnapshots` writing them about `--ema_snapshots` times to
`--output_dir`/ema_snapshots/seed_<seed>; after training,
`keras_swa.sweep_ema` rebuilds the EMA of every `sigma_rel` of `--ema_sweep`
from the snapshots and evaluates it. It prints the sweep as a table and
plots the test metrics against `sigma_rel` (`posthoc_ema.png`).

`--averaging=schedule_free` trains, besides the plain run (its SGD
iterate is the baseline), three schedule-free runs without a schedule: a
linear warmup from 0 over `--sf_warmup_epochs`, then a constant rate.
`keras_swa.ScheduleFree` around SGD without momentum (`--sf_lr`) and
around AdamW with `beta_1=0` (`--sf_adamw_lr`), and Keras' own
`keras.optimizers.ScheduleFreeAdamW` (`--sf_adamw_lr`, Keras >= 3.15),
all interpolating with `--sf_momentum`. Each gives two rows: y, the
weights it trains at (what Keras leaves in the model), and x, its average
(`keras_swa.assign_average`), both with BatchNorm recomputed; with several
seeds a second table holds each x against its y. Where Keras' own update
makes y the average (Keras 3.15 on TensorFlow and PyTorch), keras_swa
evaluates it at y and the binary says so under the table.

A flag the chosen `--averaging` does not use is refused, not ignored: given
on the command line, even at its default value, it stops the binary before
anything is loaded, in one line naming the modes that use it.
`--swa_start` is used by `compare`, `swa`, `swag` and `trajectory`;
`--swa_lr` and `--swa_anneal_epochs` by `compare`, `swa` and `swag`;
`--ema_decay`, `--ema_warmup` by `compare`, `ema` and `trajectory`; the
`--swag_*` flags by `compare`, `swag` and `trajectory`; `--ema_sigma_rels`,
`--ema_sweep` and `--ema_snapshots` by `posthoc_ema`, the `--sf_*` flags
by `schedule_free` (the table
`train_flags.MODE_FLAGS`); the other flags do not depend on the mode. Also
refused, in one line: `--swag_samples` given with `--swag_scale=0` (one
sample, the SWA mean), and `--data_dir` or `--download` where the data does
not need them (`--dataset=digits`; `--download` with the IDX files in
`--data_dir`). Without a package of the `examples` extra the binary says
which, and `pip install ".[examples]"`, in one line.

Examples:
  python -m examples.train --recipe=demo --seeds=0,1,2,3,4   # make demo
  python -m examples.train --recipe=paper --dataset=fashion_mnist \
      --data_dir=/usr/share/datasets/fashion-mnist --seeds=0,1,2
  python -m examples.train --epochs=10 --seeds=0,1,2
  python -m examples.train --averaging=posthoc_ema --epochs=10
  python -m examples.train --recipe=demo --averaging=schedule_free --seeds=0,1,2,3,4
  python -m examples.train --dataset=cifar100 --model=preresnet164 \
      --schedule=paper --epochs=225 --lr=0.1 --swa_start=126 --swa_lr=0.05 \
      --weight_decay=3e-4 --batch_size=128 --data_dir=~/tensorflow_datasets

From another folder than the checkout's root, run the file itself:
  python path/to/checkout/examples/train.py --epochs=10
"""

import dataclasses
import os
import sys

if __package__ in (None, ""):  # run as a file: python path/to/examples/train.py
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __name__ == "__main__":  # one line, not a traceback, without the extra
    from examples import _requirements

    _requirements.require("examples.train")

from examples import _cli  # noqa: E402
from examples import data as data_lib  # noqa: E402
from examples import recipes  # noqa: E402
from examples import train_flags  # noqa: E402

# Keras, TensorFlow and keras_swa are imported where they are used, after
# the flags and the data are checked: a mistake is told in a second, in one
# line, instead of after their start-up and its log lines. The job of each
# module: `train_flags` (the flags and their checks), `recipes` (learning-
# rate schedules), `runs` (the training loop), `scoring`, `report` and
# `plots` (what is measured and how it is shown).

PROG = "examples.train"
FLAGS = train_flags.FLAGS


@dataclasses.dataclass
class Plan:
    """What `prepare` checked and loaded, before any training."""

    config: dict
    swa_start: int
    seeds: list
    arrays: data_lib.Arrays
    output_dir: str


def prepare(config, given=()):
    """Checks the settings and the output folder and reads the data. The
    values of `--recipe` replace those of `config` but for the flags in
    `given` (the ones the user gave).

    Raises:
        ValueError: naming the flag, file or folder that is wrong, and what
            to do (`data.DataError`, `_cli.UsageError` included).
    """
    config = recipes.apply_recipe({**train_flags.DEFAULTS, **config}, given)
    swa_start, seeds = train_flags.validate(config)
    output_dir = _cli.check_output_dir(config["output_dir"])
    arrays = data_lib.read(config["dataset"], config["data_dir"], config["download"])
    return Plan({**config, "seeds": seeds}, swa_start, seeds, arrays, output_dir)


def run(plan):
    """Trains what `plan` asks; prints the table; writes `metrics.json`,
    `predictions.npz`, `curves.png`, `calibration.png` (and
    `posthoc_ema.png`). Returns the metrics."""
    from examples import report
    from examples import runs

    config = plan.config
    per_seed = {}
    for seed in plan.seeds:
        arrays, changed = plan.arrays, []
        if config["label_noise"]:
            arrays, changed = data_lib.with_label_noise(arrays, config["label_noise"], seed)
        dataset = data_lib.pipelines(config["dataset"], arrays, config["batch_size"], seed)
        per_seed[seed] = runs.train_seed(config, dataset, plan.arrays.y_test, plan.swa_start,
                                         seed, plan.output_dir)
        per_seed[seed]["noisy_labels"] = len(changed)
    metrics, posthoc = report.compose(plan, per_seed)
    report.write(plan, per_seed, metrics, posthoc)
    return metrics


def train(config, given=()):
    """`run(prepare(config, given))`: checks, then trains; returns the
    metrics.

    The tests' way in, not a documented interface (`main` calls `prepare`
    and `run` itself). It checks the values as the binary does, but does
    not refuse the settings a mode does not use (`check_mode_flags`,
    `check_swag_samples`): those checks need to know which flags the user
    gave, and a settings dict holds every key, whatever the mode. With a
    `recipe`, pass the keys that keep their value in `given`.
    """
    return run(prepare(config, given))


def main(argv):
    del argv  # checked by _cli.run
    config = {name: FLAGS[name].value for name in train_flags.CONFIG_KEYS}
    try:
        given = [n for n in train_flags.CONFIG_KEYS if FLAGS[n].present]
        config = recipes.apply_recipe(config, given)
        train_flags.check_mode_flags(config["averaging"], given, config["recipe"])
        train_flags.check_swag_samples(config, given)
        plan = prepare(config, given)
    except ValueError as e:
        raise _cli.UsageError(str(e)) from None
    run(plan)


if __name__ == "__main__":
    _cli.run(main, PROG)

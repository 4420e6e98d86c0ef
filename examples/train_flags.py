"""The flags of `examples.train` and their checks, without Keras.

Every flag is defined here, with the tables that say which `--averaging`
mode reads which flag (`MODE_FLAGS`) and the defaults a caller of
`examples.train.train` may leave out (`DEFAULTS`). Nothing here imports
Keras or TensorFlow: a mistake is told in a second, in one line.
"""

import math
import re
from importlib import metadata

from absl import flags

from examples import recipes

# The keys of `models.MODELS` (a test keeps them in step), here so that the
# flags are checked without importing Keras.
MODEL_NAMES = ("small_cnn", "vgg16_bn", "preresnet110", "preresnet164", "wrn28_10")
SCHEDULES = ("cosine", "paper", "constant")
AVERAGING = ("compare", "sgd", "swa", "swag", "ema", "posthoc_ema", "trajectory",
             "schedule_free")
# keras_swa.averaging.MAX_SIGMA_REL (a test keeps them in step), here so
# that the flags are checked without importing Keras: the widest
# power-function EMA profile.
MAX_SIGMA_REL = 0.28

FLAGS = flags.FLAGS
flags.DEFINE_enum("recipe", None, tuple(recipes.RECIPES),
                  "A setting fixed in advance: 'demo' (every averager on one constant-rate "
                  "SGD run with 20% label noise, digits; make demo) or 'paper' (the SWA "
                  "recipe of torch.optim.swa_utils: coupled L2, cosine, SWA from 75% at "
                  "0.01 after a one-epoch anneal; e.g. --dataset=fashion_mnist "
                  "--data_dir=DIR). Flags given beside it override its values.")
flags.DEFINE_string("dataset", "digits", "'digits' (offline) or a tensorflow-datasets name.")
flags.DEFINE_string("data_dir", None,
                    "tensorflow-datasets data, or the IDX files of (fashion_)mnist "
                    "(not with --dataset=digits).")
flags.DEFINE_bool("download", False,
                  "Let tensorflow-datasets download a missing dataset (not with "
                  "--dataset=digits, nor with the IDX files in --data_dir).")
flags.DEFINE_enum("model", "small_cnn", MODEL_NAMES, "The network.")
flags.DEFINE_integer("epochs", 40, "Training budget in epochs, the same for every run.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_enum("schedule", "cosine", SCHEDULES,
                  "Learning-rate schedule: 'cosine' (any budget), 'paper' (the SWA paper's, "
                  "for 150-225-epoch budgets) or 'constant'. See the module docstring.")
flags.DEFINE_float("lr", 0.05, "Initial learning rate.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 5e-4, "Decoupled weight decay of SGD (Keras').")
flags.DEFINE_float("l2", 0.0,
                   "Coupled L2, as torch.optim.SGD's weight_decay: l2 * w added to the "
                   "gradient of every parameter (through the momentum).")
flags.DEFINE_float("label_noise", 0.0,
                   "Share of the training labels replaced by another class, drawn per "
                   "seed (symmetric noise); the test labels stay clean.")
flags.DEFINE_string("swa_start", None,
                    "First averaged epoch: an integer epoch, or a fraction of --epochs. "
                    "Default: 0.75 with --schedule=cosine, 0.5 with --schedule=paper.")
flags.DEFINE_float("swa_lr", 0.01, "Learning rate of the SWA phase.")
flags.DEFINE_integer("swa_anneal_epochs", 0,
                     "0: the SWA run's schedule reaches --swa_lr at --swa_start. N > 0: it "
                     "follows the plain schedule, and the SWA callback anneals from there "
                     "to --swa_lr over N epochs (torch's SWALR).")
flags.DEFINE_float("ema_decay", 0.998, "Decay of the EMA average.")
flags.DEFINE_bool("ema_warmup", True,
                  "Ramp the EMA decay up as min(decay, (1 + n) / (10 + n)), so that the "
                  "initial weights do not linger in short runs.")
flags.DEFINE_enum("averaging", "compare", AVERAGING,
                  "Which runs to train: 'compare' (the plain/EMA run and the SWA/SWAG "
                  "run), 'sgd', 'swa', 'swag' (the SWA run with SWAG), 'ema', "
                  "'posthoc_ema', 'trajectory' (one plain run carrying SWA, SWAG and "
                  "EMA) or 'schedule_free' (the plain run, ScheduleFree(SGD), "
                  "ScheduleFree(AdamW) and Keras' ScheduleFreeAdamW, each at y and x); "
                  "see the module docstring.")
flags.DEFINE_integer("swag_rank", 20, "Deviation columns SWAG keeps (its max_rank).")
flags.DEFINE_integer("swag_samples", 30, "Weight samples of the SWAG-BMA prediction.")
flags.DEFINE_float("swag_scale", 0.5,
                   "Scale of the SWAG covariance when sampling (0: one sample, the SWA "
                   "mean, and --swag_samples is refused).")
flags.DEFINE_integer("swag_bn_batches", 50,
                     "Training batches the BatchNorm statistics of each SWAG sample are "
                     "recomputed on.")
flags.DEFINE_list("ema_sigma_rels", ["0.05", "0.10"],
                  "The sigma_rel of the power-function EMAs PostHocEMA tracks "
                  "(--averaging=posthoc_ema).")
flags.DEFINE_list("ema_sweep", ["0.02", "0.03", "0.05", "0.07", "0.10", "0.13", "0.16", "0.20"],
                  "The sigma_rel values rebuilt from the snapshots after training and "
                  "evaluated (--averaging=posthoc_ema).")
flags.DEFINE_integer("ema_snapshots", 20,
                     "About how many EMA snapshots to write over the run, evenly spaced, "
                     "the last at the last update (--averaging=posthoc_ema).")
flags.DEFINE_float("sf_lr", 0.5,
                   "Learning rate of ScheduleFree(SGD) (--averaging=schedule_free), "
                   "constant after the warmup.")
flags.DEFINE_float("sf_adamw_lr", 0.0025,
                   "Learning rate of ScheduleFree(AdamW) and of Keras' ScheduleFreeAdamW "
                   "(--averaging=schedule_free), constant after the warmup.")
flags.DEFINE_float("sf_momentum", 0.9,
                   "The interpolation of the schedule-free runs: y = (1 - m) z + m x "
                   "(--averaging=schedule_free).")
flags.DEFINE_integer("sf_warmup_epochs", 1,
                     "Epochs of linear warmup from 0 of the schedule-free runs "
                     "(--averaging=schedule_free).")
flags.DEFINE_list("seeds", ["0"],
                  "Comma-separated seeds (initial weights, data order, augmentation); "
                  "with several, the table gives mean +- standard deviation.")
flags.DEFINE_string("output_dir", "runs/latest", "Where metrics.json and curves.png go.")
flags.DEFINE_integer("verbose", 2, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")

CONFIG_KEYS = ("recipe", "dataset", "data_dir", "download", "model", "epochs", "batch_size",
               "schedule", "lr", "momentum", "weight_decay", "l2", "label_noise",
               "swa_start", "swa_lr", "swa_anneal_epochs", "ema_decay", "ema_warmup", "averaging", "swag_rank", "swag_samples",
               "swag_scale", "swag_bn_batches", "ema_sigma_rels", "ema_sweep",
               "ema_snapshots", "sf_lr", "sf_adamw_lr", "sf_momentum", "sf_warmup_epochs",
               "seeds", "output_dir", "verbose")
# Defaults of the keys a caller of `train` may leave out.
DEFAULTS = {"recipe": None, "schedule": "cosine", "l2": 0.0, "label_noise": 0.0,
            "swa_anneal_epochs": 0, "ema_warmup": True, "seeds": [0], "swa_start": None,
            "swag_rank": 20, "swag_samples": 30, "swag_scale": 0.5, "swag_bn_batches": 50,
            "ema_sigma_rels": [0.05, 0.10],
            "ema_sweep": [0.02, 0.03, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20],
            "ema_snapshots": 20, "sf_lr": 0.5, "sf_adamw_lr": 0.0025, "sf_momentum": 0.9,
            "sf_warmup_epochs": 1}
# The modes of `--averaging` that use each of these flags, and no other mode
# reads them (a test trains every mode and holds it to this table): given on
# the command line to another mode, the flag is refused rather than ignored.
# The other flags do not depend on the mode.
MODE_FLAGS = {
    "swa_start": ("compare", "swa", "swag", "trajectory"),
    **dict.fromkeys(("swa_lr", "swa_anneal_epochs"), ("compare", "swa", "swag")),
    **dict.fromkeys(("ema_decay", "ema_warmup"), ("compare", "ema", "trajectory")),
    **dict.fromkeys(("swag_rank", "swag_samples", "swag_scale", "swag_bn_batches"),
                    ("compare", "swag", "trajectory")),
    **dict.fromkeys(("ema_sigma_rels", "ema_sweep", "ema_snapshots"), ("posthoc_ema",)),
    **dict.fromkeys(("sf_lr", "sf_adamw_lr", "sf_momentum", "sf_warmup_epochs"),
                    ("schedule_free",)),
}
# The default `--swa_start` of each schedule. Cosine: measured on digits at
# 10 and 20 epochs (docs/examples.md), 0.75 beats 0.5 (the SWA run anneals
# over more epochs before averaging); paper: about the paper's 126 of 225.
# Constant: half of the budget (the SWA paper's start).
SWA_START = {"cosine": "0.75", "paper": "0.5", "constant": "0.5"}


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


def parse_sigma_rels(values, flag):
    """The floats of `--flag` (a list of floats or of their strings), each
    in (0, MAX_SIGMA_REL), distinct, at least one."""
    if not isinstance(values, (list, tuple)):
        values = [values]
    text = ",".join(map(str, values))
    expected = (f"--{flag} must be distinct floats in (0, {MAX_SIGMA_REL}) separated "
                f"by commas (e.g. 0.05,0.10), got {text!r}.")
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(expected) from None
    if (not floats or len(set(floats)) != len(floats)
            or not all(0.0 < v < MAX_SIGMA_REL for v in floats)):
        raise ValueError(expected)
    return floats


def check_keras_schedule_free():
    """Raises a ValueError if the installed Keras predates its
    `ScheduleFreeAdamW` (3.15), which `--averaging=schedule_free` trains;
    reads the version without importing Keras."""
    try:
        version = metadata.version("keras")
    except metadata.PackageNotFoundError:
        return  # `_requirements` says what to install
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and tuple(map(int, found.groups())) < (3, 15):
        raise ValueError(
            f"--averaging=schedule_free needs Keras >= 3.15 (for "
            f"keras.optimizers.ScheduleFreeAdamW), found {version}: "
            f'pip install "keras>=3.15".'
        )


def validate(config):
    """Checks the settings; returns the SWA start epoch and the seeds, and
    stores the parsed `sigma_rel` lists back into `config`.

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
        ("l2", config["l2"] >= 0, "a float >= 0"),
        ("label_noise", 0 <= config["label_noise"] < 1, "a float in [0, 1)"),
        ("swa_anneal_epochs", config["swa_anneal_epochs"] >= 0, "an integer >= 0"),
        ("ema_decay", 0 <= config["ema_decay"] < 1, "a float in [0, 1)"),
        ("verbose", config["verbose"] in (0, 1, 2), "0, 1 or 2"),
        ("swag_rank", config["swag_rank"] >= 0, "an integer >= 0"),
        ("swag_samples", config["swag_samples"] >= 1, "an integer >= 1"),
        ("swag_scale", config["swag_scale"] >= 0, "a float >= 0"),
        ("swag_bn_batches", config["swag_bn_batches"] >= 1, "an integer >= 1"),
        ("ema_snapshots", config["ema_snapshots"] >= 1, "an integer >= 1"),
        ("sf_lr", config["sf_lr"] > 0, "a float > 0"),
        ("sf_adamw_lr", config["sf_adamw_lr"] > 0, "a float > 0"),
        ("sf_momentum", 0 < config["sf_momentum"] < 1, "a float in (0, 1)"),
        ("sf_warmup_epochs", config["sf_warmup_epochs"] >= 0, "an integer >= 0"),
        ("schedule", config["schedule"] in SCHEDULES, " or ".join(SCHEDULES)),
        ("averaging", config["averaging"] in AVERAGING, ", ".join(AVERAGING)),
        ("model", config["model"] in MODEL_NAMES, "one of " + ", ".join(MODEL_NAMES)),
        ("dataset", bool(config["dataset"]), "a dataset name"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"--{name} must be {expected}, got {config[name]!r}.")
    for flag in ("ema_sigma_rels", "ema_sweep"):
        config[flag] = parse_sigma_rels(config[flag], flag)
    if config["averaging"] == "schedule_free":
        check_keras_schedule_free()
    swa_start = config["swa_start"]
    if swa_start is None:
        swa_start = SWA_START[config["schedule"]]
    return parse_swa_start(str(swa_start), config["epochs"]), parse_seeds(config["seeds"])


def check_mode_flags(averaging, given, recipe=None):
    """Raises a ValueError if a flag of `given` (the names of the flags on
    the command line, whatever their values: a default never is) is one
    `--averaging=averaging` does not use, by `MODE_FLAGS`; `recipe` names
    the `--recipe` that chose `averaging`, if one did."""
    chosen = ""
    if recipe and "averaging" not in given:
        chosen = f" (set by --recipe={recipe})"
    for name in given:
        modes = MODE_FLAGS.get(name)
        if modes and averaging not in modes:
            users = modes[0] if len(modes) == 1 else f"{', '.join(modes[:-1])} or {modes[-1]}"
            raise ValueError(
                f"--{name} is used only with --averaging={users}, not "
                f"--averaging={averaging}{chosen}: drop it or change --averaging."
            )


def check_swag_samples(config, given):
    """Raises a ValueError if `--swag_samples` is in `given` (the flags on
    the command line) with `--swag_scale=0`: `predict_bma` then takes one
    sample, the SWA mean, so the number asked for would be ignored. Left
    at its default, it is not refused: the run reports its one sample."""
    if "swag_samples" in given and config["swag_scale"] == 0:
        raise ValueError(
            "--swag_samples is not used with --swag_scale=0 (one sample: the SWA "
            "mean): drop --swag_samples or pass --swag_scale > 0."
        )


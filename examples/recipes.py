"""The recipes of `examples.train` (`--recipe`) and its learning-rate
schedules, per epoch (0-based).

Pure Python: the flags are checked and the schedules built without Keras.
"""

import math

# `--recipe=NAME`: a setting fixed in advance, as flag values. A flag given
# on the command line overrides the recipe's value; the flags a recipe does
# not name keep their defaults. docs/results.md gives what each measured.
RECIPES = {
    # The demo (`make demo`): every averager on one SGD trajectory where the
    # literature predicts that averaging matters, fixed before any result
    # was seen (docs/results.md): a constant learning rate (the final
    # iterate keeps its SGD noise, which an average removes: Polyak and
    # Juditsky, 1992; Izmailov et al., 2018, section 3.3) and 20% of the
    # training labels replaced by another class (averages resist
    # memorising them: Morales-Brotons et al., 2024). Small data, small
    # model: seconds per epoch on a CPU.
    "demo": {
        "dataset": "digits",
        "model": "small_cnn",
        "averaging": "trajectory",
        "schedule": "constant",
        "epochs": 20,
        "batch_size": 32,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "l2": 0.0,
        "label_noise": 0.2,
        "swa_start": "0.5",
        "ema_decay": 0.998,
        "ema_warmup": True,
    },
    # The SWA recipe as `torch.optim.swa_utils` is used (PyTorch's SWA
    # tutorial): SGD with momentum 0.9 and coupled L2 (torch's
    # `weight_decay`, 5e-4 on every parameter, through the momentum),
    # cosine annealing over the budget, cut at 75% of it, where SWA
    # starts and anneals to 0.01 over one epoch (`SWALR(swa_lr=0.01,
    # anneal_epochs=1)`), averaging every epoch. Plain SGD and EMA follow
    # the whole cosine. For `--dataset=fashion_mnist --data_dir=DIR` (the
    # IDX files) or any tensorflow-datasets set.
    "paper": {
        "model": "small_cnn",
        "averaging": "compare",
        "schedule": "cosine",
        "epochs": 12,
        "batch_size": 128,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "l2": 5e-4,
        "swa_start": "0.75",
        "swa_lr": 0.01,
        "swa_anneal_epochs": 1,
    },
}


def apply_recipe(config, given):
    """`config` with the values of its `--recipe` (a key of `RECIPES`, or
    None) for the flags that are not in `given` (the flags the user gave:
    those keep their value)."""
    name = config.get("recipe")
    if name is None:
        return dict(config)
    if name not in RECIPES:
        raise ValueError(
            f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}."
        )
    preset = {k: v for k, v in RECIPES[name].items() if k not in given}
    return {**config, **preset}


def constant_schedule(lr):
    """`lr` at every epoch."""

    def schedule(epoch, current_lr=None):
        return lr

    return schedule


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


def plain_schedule(config):
    """The per-epoch learning rate of `--schedule` for the runs without SWA
    (plain, EMA, post-hoc EMA)."""
    lr, epochs = config["lr"], config["epochs"]
    if config["schedule"] == "paper":
        return paper_schedule(lr, epochs, 0.01)
    if config["schedule"] == "constant":
        return constant_schedule(lr)
    return cosine_schedule(lr, epochs)


def swa_schedule(config, swa_start):
    """The per-epoch learning rate of `--schedule` for the SWA run. Apart
    from `plain_schedule`, so that a mode without the SWA run reads neither
    `--swa_lr` nor `--swa_start` (a test holds each mode to `MODE_FLAGS`).

    With `--swa_anneal_epochs=0` the schedule itself reaches `--swa_lr` at
    `--swa_start` and holds it. With `--swa_anneal_epochs > 0` the SWA run
    follows the plain schedule, and from `--swa_start` on the SWA callback
    anneals from there to `--swa_lr` (as `torch.optim.swa_utils.SWALR`).
    """
    if config["swa_anneal_epochs"] > 0:
        return plain_schedule(config)
    lr, swa_lr = config["lr"], config["swa_lr"]
    if config["schedule"] == "paper":
        return paper_schedule(lr, max(swa_start, 1), swa_lr / lr)
    if config["schedule"] == "constant":
        return lambda epoch, current_lr=None: lr if epoch < swa_start else swa_lr
    return cosine_schedule(lr, swa_start, swa_lr)


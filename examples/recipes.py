"""Learning-rate schedules of `examples.train`, per epoch (0-based).

Pure Python: the flags are checked and the schedules built without Keras.
"""

import math


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
    return cosine_schedule(lr, epochs)


def swa_schedule(config, swa_start):
    """The per-epoch learning rate of `--schedule` for the SWA run. Apart
    from `plain_schedule`, so that a mode without the SWA run reads neither
    `--swa_lr` nor `--swa_start` (a test holds each mode to `MODE_FLAGS`)."""
    lr, swa_lr = config["lr"], config["swa_lr"]
    if config["schedule"] == "paper":
        return paper_schedule(lr, max(swa_start, 1), swa_lr / lr)
    return cosine_schedule(lr, swa_start, swa_lr)


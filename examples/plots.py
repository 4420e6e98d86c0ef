"""The figures of `examples.train`: accuracy curves, the reliability
diagram and the post-hoc EMA sweep (Matplotlib, imported when drawing)."""

from examples.scoring import ECE_BINS
from examples.scoring import LABELS
from examples.scoring import METRICS
from examples.scoring import calibration_bins


# The curve of each run (`runs.MODE_RUNS` names them): the weights it
# trains at, with the running BatchNorm statistics.
RUN_CURVES = {"swa": "SWA run: iterate", "sf": "ScheduleFree(SGD) run: y",
              "sf_adamw": "ScheduleFree(AdamW) run: y",
              "keras_sf": "Keras ScheduleFreeAdamW run: y"}


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
        label = RUN_CURVES.get(name, "SGD run: iterate")
        _band(ax, curves, 1, label)
        lowest.append(min(min(c[len(c) // 4:]) for c in curves))
        history = first[name]["history"]
        if "val_swa_accuracy" in history:  # the SWA (or trajectory) run
            swa = [per_seed[s]["runs"][name]["history"]["val_swa_accuracy"] for s in seeds]
            start = len(history["val_accuracy"]) - len(swa[0]) + 1
            run = "SWA run: " if name == "swa" else ""
            _band(ax, swa, start, f"{run}SWA average (BN recomputed)", marker="o",
                  markersize=3)
    epochs = len(first[next(iter(first))]["history"]["val_accuracy"])
    markers = {"sgd": "s", "swa_iterate": "^", "swa": "*", "swag": "P", "ema": "D"}
    for i, key in enumerate(k for k in LABELS if k in summary):
        # Side by side after the last epoch, so that equal results stay visible.
        x = epochs + 0.5 + i * max(epochs, 4) / 40
        ax.plot([x], [summary[key]["accuracy"] * 100], markers.get(key, "X"), markersize=9,
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


def calibration_figure(per_seed, labels, summary, title):
    """The reliability diagram of every row (the predictions of all seeds
    pooled): accuracy against mean confidence per bin, a marker's area
    growing with the bin's share of predictions, above the share of
    predictions per bin. Returns the Matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seeds = list(per_seed)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9.5, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    top.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1,
             label="perfect calibration")
    edges = np.linspace(0, 1, ECE_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for key, label in LABELS.items():
        if key not in summary:
            continue
        probabilities = np.concatenate([per_seed[s]["probabilities"][key] for s in seeds])
        counts, confidence, accuracy = calibration_bins(
            probabilities, np.tile(labels, len(seeds))
        )
        filled = counts > 0
        share = counts / counts.sum()
        (line,) = top.plot(confidence[filled], accuracy[filled], linewidth=1, alpha=0.8,
                           label=f"{label} (ECE {summary[key]['ece']:.4f})")
        top.scatter(confidence[filled], accuracy[filled], s=10 + 300 * np.sqrt(share[filled]),
                    color=line.get_color(), alpha=0.6, edgecolors="none")
        bottom.plot(centres[filled], share[filled], marker="o", markersize=3,
                    color=line.get_color())
    top.set_ylabel("accuracy in the bin")
    top.set_xlim(0, 1.02)
    top.set_ylim(-0.02, 1.02)
    top.grid(alpha=0.3)
    pooled = f"{len(seeds)} seeds pooled, " if len(seeds) > 1 else ""
    top.set_title(f"{title}\nreliability diagram: {pooled}{ECE_BINS} equal-width "
                  "confidence bins, marker area ~ share of predictions", fontsize=10)
    top.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small",
               borderaxespad=0.0)
    bottom.set_yscale("log")
    bottom.set_xlabel("confidence (largest class probability)")
    bottom.set_ylabel("share of\npredictions")
    bottom.grid(alpha=0.3)
    return fig


def posthoc_figure(sweep_summary, summary, config, title):
    """The post-hoc EMA sweep: test accuracy, NLL and ECE against
    `sigma_rel` (mean over seeds, min-max band), with plain SGD as a line
    and the tracked `sigma_rel` marked. Returns the Matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sigma_rels = config["ema_sweep"]
    rows = [sweep_summary[f"ema@{s:g}"] for s in sigma_rels]
    order = np.argsort(sigma_rels)
    x = np.array(sigma_rels)[order]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = {"accuracy": "test accuracy (%)", "nll": "test NLL", "ece": "test ECE"}
    for ax, metric in zip(axes, METRICS):
        scale = 100 if metric == "accuracy" else 1
        values = np.array([r[f"{metric}_per_seed"] for r in rows])[order] * scale
        ax.plot(x, values.mean(axis=1), marker="o", label="post-hoc EMA (reconstructed)")
        if values.shape[1] > 1:
            ax.fill_between(x, values.min(axis=1), values.max(axis=1), alpha=0.15,
                            linewidth=0, label="min to max over seeds")
        ax.axhline(summary["sgd"][metric] * scale, color="0.3", linestyle="--",
                   linewidth=1, label=LABELS["sgd"])
        for i, tracked in enumerate(config["ema_sigma_rels"]):
            ax.axvline(tracked, color="tab:red", linestyle=":", linewidth=1,
                       label="tracked sigma_rel" if i == 0 else None)
        ax.set_xlabel("sigma_rel")
        ax.set_title(names[metric], fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\npost-hoc EMA: every point rebuilt after training from the "
                 "snapshots, BN recomputed", fontsize=10)
    handles, texts = axes[0].get_legend_handles_labels()
    fig.legend(handles, texts, loc="lower center", ncol=len(texts), fontsize="small",
               bbox_to_anchor=(0.5, -0.06))
    fig.tight_layout()
    return fig


def save(fig, path):
    """Writes the Matplotlib figure `fig` as a PNG to `path`."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


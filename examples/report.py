"""The report of `examples.train`: the table over seeds, the sentences
under it, and the files it writes (`metrics.json`, `predictions.npz`)."""

import statistics

from examples import stats
from examples.scoring import ECE_BINS
from examples.scoring import LABELS
from examples.scoring import METRICS

# How a difference of each metric is shown: factor, unit, format.
UNITS = {"accuracy": (100, " points", "+.2f"), "nll": (1, "", "+.4f"), "ece": (1, "", "+.4f")}
METRIC_NAMES = {"accuracy": "accuracy", "nll": "NLL", "ece": "ECE"}
# The rows (y, x) of each schedule-free optimizer, and its run's prefix.
SCHEDULE_FREE_ROWS = {"sf": ("sf_y", "sf_x"), "sf_adamw": ("sf_adamw_y", "sf_adamw_x"),
                      "keras_sf": ("keras_sf_y", "keras_sf_x")}


def summarize(finals):
    """Mean and sample standard deviation (None for one seed) of each row
    over the per-seed results `finals` (a list of `{row: {"accuracy",
    "nll", "ece"}}`), with the per-seed values."""
    summary = {}
    for row in finals[0]:
        summary[row] = {}
        for metric in METRICS:
            values = [float(f[row][metric]) for f in finals]
            summary[row][metric] = statistics.fmean(values)
            summary[row][f"{metric}_std"] = (
                statistics.stdev(values) if len(values) > 1 else None
            )
            summary[row][f"{metric}_per_seed"] = values
    return summary


def _cell(row, metric):
    """`mean ± std` of a metric, accuracy in percent."""
    if metric == "accuracy":
        mean, std = row["accuracy"] * 100, row["accuracy_std"]
        return f"{mean:.2f}%" if std is None else f"{mean:.2f} ± {std * 100:.2f}%"
    mean, std = row[metric], row[f"{metric}_std"]
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def format_table(summary, labels=None):
    """The Markdown table of `summarize`'s rows, in the order of `labels`
    (`{row: label}`; `LABELS` by default)."""
    labels = LABELS if labels is None else labels
    keys = [k for k in labels if k in summary]
    width = max([20, *(len(labels[k]) for k in keys)])
    header = ("test accuracy", "test NLL", "test ECE")
    widths = (16, 17, 17)
    lines = [
        f"| {'model':<{width}} | " + " | ".join(f"{h:>{w}}" for h, w in zip(header, widths)) + " |",
        f"|{'-' * (width + 2)}|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for key in keys:
        cells = [f"{_cell(summary[key], m):>{w}}" for m, w in zip(METRICS, widths)]
        lines.append(f"| {labels[key]:<{width}} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _join(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def baseline(summary):
    """The row the others are held against: the SGD iterate, else the SWA
    run's iterate; None when there is neither."""
    for key in ("sgd", "swa_iterate"):
        if key in summary:
            return key
    return None


def differences(summary, labels=None):
    """Each row's paired difference to the baseline's (`stats.
    paired_difference`), per metric: `{row: {metric: difference}}`, in the
    order of `labels` (`LABELS` by default); empty without a baseline."""
    labels = LABELS if labels is None else labels
    base = baseline(summary)
    if base is None:
        return {}
    return {
        row: {m: stats.paired_difference(summary[row][f"{m}_per_seed"],
                                         summary[base][f"{m}_per_seed"], m)
              for m in METRICS}
        for row in labels if row in summary and row != base
    }


def x_against_y(summary):
    """Each schedule-free optimizer's paired difference x - y (its average
    to the weights it trains at), per metric: `{x_row: {metric:
    difference}}`; empty without schedule-free rows."""
    return {
        x: {m: stats.paired_difference(summary[x][f"{m}_per_seed"],
                                       summary[y][f"{m}_per_seed"], m)
            for m in METRICS}
        for y, x in SCHEDULE_FREE_ROWS.values() if x in summary and y in summary
    }


def _value(metric, value):
    """A difference of `metric` as `UNITS` shows it; one that rounds to
    zero is "+0.00", not "-0.00"."""
    scale, unit, spec = UNITS[metric]
    digits = int(spec.rsplit(".", 1)[1][:-1])
    return f"{round(value * scale, digits) + 0.0:{spec}}"


def format_differences(summary, diffs, labels=None, against=None):
    """The Markdown table of `differences` (or `x_against_y`): per row and
    metric the mean difference, its 95% interval and the verdict
    ("better", "worse" or "no significant difference"), under a line that
    says what it is, the difference to `against` (the baseline's label by
    default)."""
    labels = LABELS if labels is None else labels
    n = len(summary[next(iter(summary))]["accuracy_per_seed"])
    against = against or (f"to {labels[baseline(summary)]} (same seed: same initial "
                          f"weights and data order)")
    width = max([12, *(len(labels[r]) for r in diffs)])
    lines = [
        f"Paired difference {against}, mean and {stats.CONFIDENCE:.0%} "
        f"t-interval over {n} seeds; accuracy in points:",
        "",
        f"| {'row':<{width}} | metric   | difference | {'95% interval':<20} | verdict |",
        f"|{'-' * (width + 2)}|----------|-----------:|{'-' * 22}|---------|",
    ]
    for row, per_metric in diffs.items():
        for metric, d in per_metric.items():
            interval = f"[{_value(metric, d['low'])}, {_value(metric, d['high'])}]"
            lines.append(
                f"| {labels[row]:<{width}} | {METRIC_NAMES[metric]:<8} | "
                f"{_value(metric, d['mean']):>10} | {interval:<20} | {d['verdict']} |"
            )
    return "\n".join(lines)


def _join(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def conclusion(summary, labels=None):
    """One sentence on the rows against the baseline (`baseline`): with
    several seeds, which differences the paired 95% t-intervals find
    better, worse or not significant; with one seed, that there is no
    interval to judge by."""
    labels = LABELS if labels is None else labels
    base, diffs = baseline(summary), differences(summary, labels)
    if not diffs:
        return ("One row only: nothing to compare (--averaging=compare or "
                "trajectory trains several).")
    n = len(summary[base]["accuracy_per_seed"])
    if n == 1:
        listed = [f"{labels[r]} {_value('accuracy', d['accuracy']['mean'])} points"
                  for r, d in diffs.items()]
        return (
            f"One seed, so no interval to hold the differences against "
            f"({_join(listed)} in accuracy against {labels[base]}): rerun with "
            f"--seeds=0,1,2,3,4 before reading anything into them."
        )
    verdicts = {"better": [], "worse": [], stats.NO_DIFFERENCE: []}
    for row, per_metric in diffs.items():
        for metric, d in per_metric.items():
            unit = UNITS[metric][1]
            verdicts[d["verdict"]].append(
                f"{labels[row]} {METRIC_NAMES[metric]} ({_value(metric, d['mean'])}{unit})")
    parts = [f"{verdict}: {_join(items)}" for verdict, items in verdicts.items() if items]
    return (f"Over {n} seeds, against {labels[base]} (paired, "
            f"{stats.CONFIDENCE:.0%} t-intervals): {'; '.join(parts)}.")


def sweep_labels(config):
    """`{row: label}` of the post-hoc EMA table: plain SGD, then one row per
    `sigma_rel` of the sweep (rows keyed `ema@<sigma_rel>`)."""
    labels = {"sgd": LABELS["sgd"]}
    for sigma_rel in config["ema_sweep"]:
        tracked = " (tracked)" if sigma_rel in config["ema_sigma_rels"] else ""
        labels[f"ema@{sigma_rel:g}"] = f"EMA sigma_rel={sigma_rel:g}{tracked}"
    return labels


def sweep_rows(per_seed_result):
    """One seed's sweep as rows `{ema@<sigma_rel>: {metric: value}}`."""
    return {
        f"ema@{row['sigma_rel']:g}": {m: row[m] for m in METRICS}
        for row in per_seed_result["posthoc_ema"]["sweep"]
    }


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


def schedule_free_note(per_seed):
    """A line when Keras' ScheduleFreeAdamW's x was its y in every seed
    (keras_swa evaluates it at y where Keras' update makes y the average
    of its iterates); or None."""
    if not all(result.get("keras_sf_x_is_y") for result in per_seed.values()):
        return None
    return (
        "Note: Keras ScheduleFreeAdamW: x is y. On this backend Keras' update recovers "
        "its old x from the momentum it has just updated (a Keras 3.15 defect), which "
        "makes its weights y the running mean of its iterates: keras_swa evaluates it "
        "there (docs/schedule_free.md, \"Keras defects\")."
    )


def describe(plan, summary):
    """The paragraph above the table: model, data, budget, seeds, and how
    every row is evaluated."""
    config, seeds = plan.config, plan.seeds
    over = (f"mean ± standard deviation over seeds {', '.join(map(str, seeds))}"
            if len(seeds) > 1 else f"seed {seeds[0]}")
    recipe = f"--recipe={config['recipe']}: " if config["recipe"] else ""
    swa = f", SWA from epoch {plan.swa_start}" if "swa" in summary else ""
    if "swa" in summary and config["averaging"] == "trajectory":
        swa += " (same trajectory, same learning rate)"
    elif "swa" in summary and config["swa_anneal_epochs"]:
        swa += (f" (the callback anneals to {config['swa_lr']:g} over "
                f"{config['swa_anneal_epochs']} epoch(s))")
    noise = (f", {config['label_noise']:.0%} of the training labels replaced by another "
             f"class (drawn per seed)" if config["label_noise"] else "")
    l2 = f", coupled L2 {config['l2']:g}" if config["l2"] else ""
    text = (
        f"{recipe}{config['model']} on {config['dataset']} ({len(plan.arrays.x_test)} test "
        f"images{noise}), {config['epochs']} epochs, {config['schedule']} schedule from "
        f"lr {config['lr']:g}{l2}{swa}; {over}. Every row is evaluated with its "
        f"BatchNorm statistics recomputed on the training set (keras_swa.update_bn). "
        f"NLL: mean negative log-probability of the true class; ECE: expected "
        f"calibration error, {ECE_BINS} bins."
    )
    if any(y in summary for y, _ in SCHEDULE_FREE_ROWS.values()):
        text += (
            f" Schedule-free runs, no schedule: a linear warmup from 0 over "
            f"{config['sf_warmup_epochs']} epoch(s), then a constant rate; "
            f"ScheduleFree(SGD) at {config['sf_lr']:g} (no momentum), ScheduleFree(AdamW) "
            f"(beta_1=0) and Keras' ScheduleFreeAdamW at {config['sf_adamw_lr']:g}, "
            f"interpolation {config['sf_momentum']:g}; y: the weights each trains at "
            f"(what Keras leaves in the model), x: its average (keras_swa.assign_average)."
        )
    if "swag" in summary:
        text += (
            f" SWAG-BMA: the mean probabilities of {config['swag_samples']} samples of "
            f"the SWAG posterior (rank {config['swag_rank']} at most, scale "
            f"{config['swag_scale']:g}), each with BatchNorm recomputed on "
            f"{config['swag_bn_batches']} training batches at most."
        )
    return text


def bma_timing(plan, per_seed):
    """A line on the time `predict_bma` took per sample; or None."""
    timings = [per_seed[s]["swag"]["bma_seconds_per_sample"] for s in plan.seeds
               if "swag" in per_seed[s]]
    if not timings:
        return None
    first = per_seed[plan.seeds[0]]["swag"]
    return (
        f"keras_swa.predict_bma: {statistics.fmean(timings):.3f} s per sample "
        f"({first['samples']} samples; a BatchNorm pass over at most "
        f"{plan.config['swag_bn_batches']} training batches and a prediction of the "
        f"{len(plan.arrays.x_test)} test images each), mean over {len(timings)} "
        f"seed(s). The posterior had {first['n_averaged']} snapshots, rank "
        f"{first['rank']} (seed {plan.seeds[0]})."
    )


def report_posthoc_ema(plan, per_seed, summary):
    """The sweep's table, sentences and summary; None without a sweep."""
    seeds = plan.seeds
    if "posthoc_ema" not in per_seed[seeds[0]]:
        return None
    first = per_seed[seeds[0]]["posthoc_ema"]
    sweep_summary = summarize([sweep_rows(per_seed[s]) for s in seeds])
    labels = sweep_labels(plan.config)
    combined = {**sweep_summary, "sgd": summary["sgd"]}
    diffs = differences(combined, labels)
    sentence = conclusion(combined, labels)
    header = (
        f"Post-hoc EMA: one training run under PostHocEMA (sigma_rel "
        f"{', '.join(f'{s:g}' for s in plan.config['ema_sigma_rels'])}), "
        f"{first['snapshots']} snapshots every {first['every_n_steps']} of its "
        f"{first['updates']} updates; each row rebuilt after training by "
        f"keras_swa.sweep_ema from the snapshots, BatchNorm recomputed "
        f"({statistics.fmean(per_seed[s]['posthoc_ema']['sweep_seconds'] for s in seeds):.1f} s "
        f"for the sweep)."
    )
    paragraphs = [header, format_table(combined, labels)]
    if len(seeds) > 1:
        paragraphs.append(format_differences(combined, diffs, labels))
    text = "\n\n".join([*paragraphs, sentence])
    return {"text": text, "summary": sweep_summary, "conclusion": sentence,
            "differences": diffs, "labels": labels}


def save_predictions(path, per_seed, labels):
    """Writes every row's test probabilities, per seed, to the `.npz` file
    `path`: `labels`, and `<row>_seed<seed>` arrays (float32)."""
    import numpy as np

    arrays = {"labels": np.asarray(labels)}
    for seed, result in per_seed.items():
        for row, probabilities in result["probabilities"].items():
            arrays[f"{row}_seed{seed}"] = probabilities
    np.savez_compressed(path, **arrays)


def compose(plan, per_seed):
    """The report of the runs of every seed: prints the table and its
    sentences; returns the metrics (metrics.json's content) and the
    post-hoc EMA sweep's report (None without one)."""
    config, seeds = plan.config, plan.seeds
    summary = summarize([per_seed[s]["final"] for s in seeds])
    running = {k: {"accuracy": statistics.fmean(per_seed[s]["running_bn"][k]["accuracy"]
                                                for s in seeds)}
               for k in per_seed[seeds[0]]["running_bn"]}
    header = describe(plan, summary)
    diffs = differences(summary)
    sentence = conclusion(summary)
    note = running_bn_note(summary, running)
    timing = bma_timing(plan, per_seed)
    posthoc = report_posthoc_ema(plan, per_seed, summary)
    if posthoc:  # its table has the plain row too
        paragraphs = [header, posthoc["text"], note]
    else:
        table = format_differences(summary, diffs) if diffs and len(seeds) > 1 else None
        paragraphs = [header, format_table(summary), table, sentence, timing, note]
    sf_diffs = x_against_y(summary)
    if sf_diffs and len(seeds) > 1:
        paragraphs.insert(3, format_differences(
            summary, sf_diffs, against="of each schedule-free x to its y (same run)"))
    paragraphs.append(schedule_free_note(per_seed))
    print("\n" + "\n\n".join(p for p in paragraphs if p), flush=True)
    metrics = {
        "config": config,
        "seeds": seeds,
        "swa_start_epoch": plan.swa_start,
        "evaluation": header,
        "final": summary,
        "baseline": baseline(summary),
        "differences": diffs,
        "conclusion": sentence,
        "running_bn_note": note,
        "swag_bma_timing": timing,
        "schedule_free_x_vs_y": sf_diffs,
        "per_seed": {str(s): {k: v for k, v in per_seed[s].items() if k != "probabilities"}
                     for s in seeds},
    }
    if posthoc:
        metrics["posthoc_ema"] = {
            "sweep": posthoc["summary"],
            "labels": posthoc["labels"],
            "differences": posthoc["differences"],
            "conclusion": posthoc["conclusion"],
        }
    return metrics, posthoc


def write(plan, per_seed, metrics, posthoc):
    """Writes `metrics.json`, `predictions.npz`, `curves.png`,
    `calibration.png` (and `posthoc_ema.png`) to the plan's output folder."""
    import json
    import os

    from examples import plots

    config, out, labels = plan.config, plan.output_dir, plan.arrays.y_test
    files = ["metrics.json", "predictions.npz", "curves.png", "calibration.png"]
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, default=float)
    save_predictions(os.path.join(out, "predictions.npz"), per_seed, labels)
    title = (f"{config['model']} on {config['dataset']}, {config['epochs']} epochs, "
             f"{config['schedule']} schedule")
    summary = metrics["final"]
    plots.save(plots.figure(per_seed, summary, title), os.path.join(out, "curves.png"))
    plots.save(plots.calibration_figure(per_seed, labels, summary, title),
               os.path.join(out, "calibration.png"))
    if posthoc:
        plots.save(plots.posthoc_figure(posthoc["summary"], summary, config, title),
                   os.path.join(out, "posthoc_ema.png"))
        files.append("posthoc_ema.png")
    print(f"\nWrote {', '.join(files)} to {out}")

"""The report of `examples.train`: the table over seeds, the sentences
under it, and the files it writes (`metrics.json`, `predictions.npz`)."""

import statistics

from examples.scoring import ECE_BINS
from examples.scoring import LABELS
from examples.scoring import METRICS

# How `conclusion` shows a difference of each metric: factor, unit, format,
# and the differences it counts as ties (accuracies are float32 metrics).
UNITS = {"accuracy": (100, " points", ".2f", 1e-4), "nll": (1, "", ".4f", 1e-7)}


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


def conclusion(summary, resolution=0.0, metric="accuracy", labels=None):
    """One sentence: whether each row's test `metric` (`"accuracy"` or
    `"nll"`) differs from the baseline's (plain SGD; else the SWA final
    iterate) by more than the seed-to-seed spread: the larger standard
    deviation of the two rows, and at least `resolution` (for accuracy, one
    test example, as a fraction: on a small test set a one-example
    difference is the smallest there is).

    A rough screen, not a significance test: with three seeds only a large
    difference is worth reading. For `"nll"`, None when there is one row
    or one seed (the accuracy sentence says so), and no `resolution`.
    """
    labels = LABELS if labels is None else labels
    scale, unit, spec, tie = UNITS[metric]
    accuracy = metric == "accuracy"
    resolution = resolution if accuracy else 0.0
    base = "sgd" if "sgd" in summary else ("swa_iterate" if "swa_iterate" in summary else None)
    others = [k for k in labels if k in summary and k != base]
    if base is None or not others:
        return "One row only: nothing to compare (--averaging=compare trains them all)." \
            if accuracy else None
    n = len(summary[base][f"{metric}_per_seed"])
    diffs = {k: (summary[k][metric] - summary[base][metric]) * scale for k in others}
    diffs = {k: 0.0 if abs(d) <= tie else d for k, d in diffs.items()}  # no "-0.00"
    listed = [f"{labels[k]} {diffs[k]:+{spec}}{unit}" for k in others]
    if n == 1:
        if not accuracy:
            return None
        return (
            f"One seed, so no spread to hold the differences against "
            f"({_join(listed)} against {labels[base]}): rerun with --seeds=0,1,2 "
            f"before reading anything into them."
        )
    spread = {
        k: max(summary[k][f"{metric}_std"], summary[base][f"{metric}_std"], resolution) * scale
        for k in others
    }
    above = [k for k in others if abs(diffs[k]) > spread[k] + tie]
    within = [k for k in others if k not in above]
    rule = "the larger standard deviation of the two rows"
    if resolution:
        rule += f", at least one test example, {resolution * scale:{spec}}{unit}"
    opening = f"Over {n} seeds" if accuracy else f"In test NLL, over {n} seeds"

    def items(keys):
        return [f"{labels[k]} ({diffs[k]:+{spec}}{unit}, spread {spread[k]:{spec}})"
                for k in keys]

    if not above:
        return (
            f"{opening}, no row differs from {labels[base]} by more than the "
            f"seed-to-seed spread ({rule}): {_join(items(within))}."
        )
    if not within:
        return (
            f"{opening}, every row differs from {labels[base]} by more than "
            f"the seed-to-seed spread ({rule}): {_join(items(above))}."
        )
    verb = "differs" if len(above) == 1 else "differ"
    return (
        f"{opening}, {_join(items(above))} {verb} from {labels[base]} by "
        f"more than the seed-to-seed spread ({rule}); {_join(items(within))} "
        f"{'does' if len(within) == 1 else 'do'} not."
    )


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


def describe(plan, summary):
    """The paragraph above the table: model, data, budget, seeds, and how
    every row is evaluated."""
    config, seeds = plan.config, plan.seeds
    over = (f"mean ± standard deviation over seeds {', '.join(map(str, seeds))}"
            if len(seeds) > 1 else f"seed {seeds[0]}")
    swa = f", SWA from epoch {plan.swa_start}" if "swa" in summary else ""
    text = (
        f"{config['model']} on {config['dataset']} ({len(plan.arrays.x_test)} test "
        f"images), {config['epochs']} epochs, {config['schedule']} schedule{swa}; "
        f"{over}. Every row is evaluated with its BatchNorm statistics recomputed on "
        f"the training set (keras_swa.update_bn). NLL: mean negative log-probability "
        f"of the true class; ECE: expected calibration error, {ECE_BINS} bins."
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
    table = format_table({**sweep_summary, "sgd": summary["sgd"]}, labels)
    combined = {**sweep_summary, "sgd": summary["sgd"]}
    resolution = 1 / len(plan.arrays.x_test)
    sentences = [conclusion(combined, resolution, "accuracy", labels),
                 conclusion(combined, 0.0, "nll", labels)]
    header = (
        f"Post-hoc EMA: one training run under PostHocEMA (sigma_rel "
        f"{', '.join(f'{s:g}' for s in plan.config['ema_sigma_rels'])}), "
        f"{first['snapshots']} snapshots every {first['every_n_steps']} of its "
        f"{first['updates']} updates; each row rebuilt after training by "
        f"keras_swa.sweep_ema from the snapshots, BatchNorm recomputed "
        f"({statistics.fmean(per_seed[s]['posthoc_ema']['sweep_seconds'] for s in seeds):.1f} s "
        f"for the sweep)."
    )
    text = header + "\n\n" + table + "\n\n" + "\n\n".join(s for s in sentences if s)
    return {"text": text, "summary": sweep_summary, "conclusions": sentences,
            "labels": labels}


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
    resolution = 1 / len(plan.arrays.x_test)
    sentence = conclusion(summary, resolution)
    nll_sentence = conclusion(summary, 0.0, "nll")
    note = running_bn_note(summary, running)
    timing = bma_timing(plan, per_seed)
    posthoc = report_posthoc_ema(plan, per_seed, summary)
    if posthoc:  # its table has the plain row too
        paragraphs = [header, posthoc["text"], note]
    else:
        paragraphs = [header, format_table(summary), sentence, nll_sentence, timing, note]
    print("\n" + "\n\n".join(p for p in paragraphs if p), flush=True)
    metrics = {
        "config": config,
        "seeds": seeds,
        "swa_start_epoch": plan.swa_start,
        "evaluation": header,
        "final": summary,
        "conclusion": sentence,
        "conclusion_nll": nll_sentence,
        "running_bn_note": note,
        "swag_bma_timing": timing,
        "per_seed": {str(s): {k: v for k, v in per_seed[s].items() if k != "probabilities"}
                     for s in seeds},
    }
    if posthoc:
        metrics["posthoc_ema"] = {
            "sweep": posthoc["summary"],
            "labels": posthoc["labels"],
            "conclusion": posthoc["conclusions"][0],
            "conclusion_nll": posthoc["conclusions"][1],
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

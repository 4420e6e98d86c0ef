"""examples/benchmark.py: the ScheduleFree, window and offload update rows,
their bandwidth floors and measures, in-process and on a tiny model (the
whole program runs as a binary in tests/test_examples.py)."""

import json

import keras
import numpy as np
import pytest

import keras_swa
from examples import benchmark

LR, BETA = 0.01, 0.9  # the rows' SGD learning rate, momentum and SF momentum


def grads_of(model):
    """The fixed gradients of the update rows, drawn as the benchmark does."""
    rng = np.random.default_rng(0)
    return [
        rng.normal(size=v.shape).astype("float32") * 1e-3
        for v in model.trainable_variables
    ]


def sgd_weights(w0, g, steps, momentum):
    """NumPy: the weights after each of `steps` SGD steps (Keras' momentum
    form) on the fixed gradient `g`."""
    w, m, out = w0.astype("float64"), 0.0, []
    for _ in range(steps):
        m = momentum * m - LR * g
        w = w + m
        out.append(w)
    return out


def schedule_free_y(w0, g, steps):
    """NumPy: y after `steps` schedule-free steps of SGD without momentum at
    a constant learning rate (every `lr**2` weight equal: x is the plain
    mean of the z's)."""
    zs = sgd_weights(w0, g, steps, 0.0)
    return (1 - BETA) * zs[-1] + BETA * np.mean(zs, axis=0)


def test_update_rows_run_what_they_name():
    # Fails before the rows existed. Each compiled row updates
    # its own weights and state: on JAX the harness writes the donated
    # state back, so a row timing a no-op would show here.
    keras.utils.set_random_seed(0)
    model = benchmark.build_model(8, 1, 4)
    variants, optimizers, skipped = benchmark.update_variants(model)
    assert skipped == {}  # offload is accepted on every CPU backend
    steps = 7  # past the window of 5: its ring wraps around
    names = ("bare_sgd_no_momentum", "schedule_free", "swa_window_every_step",
             "swa_offload_every_step")
    for name in names:
        for _ in range(steps):
            variants[name]()
    w0 = [v.numpy() for v in model.trainable_variables]
    for w, g, index in zip(w0, grads_of(model), range(len(w0))):
        def weight(name):
            return keras.ops.convert_to_numpy(
                optimizers[name]._trainable_variables[index]
            )

        plain = sgd_weights(w, g, steps, 0.0)[-1]
        np.testing.assert_allclose(weight("bare_sgd_no_momentum"), plain, atol=1e-6)
        np.testing.assert_allclose(
            weight("schedule_free"), schedule_free_y(w, g, steps), atol=1e-6
        )
        with_momentum = sgd_weights(w, g, steps, BETA)
        for name, snapshots in [
            ("swa_window_every_step", with_momentum[-benchmark.WINDOW:]),
            ("swa_offload_every_step", with_momentum),
        ]:
            average = optimizers[name].average_variables[index]
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(average), np.mean(snapshots, axis=0),
                atol=1e-6, err_msg=name,
            )
    assert optimizers["swa_window_every_step"].window == benchmark.WINDOW
    assert optimizers["swa_offload_every_step"].offload is True
    assert isinstance(optimizers["schedule_free"], keras_swa.ScheduleFree)


def synthetic(offload=True):
    """Results of a run, with round numbers: 4 MB of weights, 1 GB/s."""
    weight_bytes, bandwidth = 4_000_000, 1e9
    updates = {
        "bare": 0.005, "swa_no_snapshot": 0.005, "swa_every_step": 0.015,
        "swa_window_every_step": 0.040, "ema_every_step": 0.015,
        "keras_use_ema": 0.015, "bare_sgd_no_momentum": 0.004,
        "schedule_free": 0.020, "raw_pass": 0.012,
    }
    if offload:
        updates["swa_offload_every_step"] = 0.015
    rows = {f"update/{k}": v for k, v in updates.items()}
    rows[benchmark.COPY] = 0.008
    return {
        "updates": updates,
        "fits": {"fit_bare": 0.03, "fit_swa_no_snapshot": 0.03, "fit_swa_every_10": 0.03},
        "bn": {"update_bn": 0.1, "forward_training_mode": 0.1},
        "rows": rows, "medians": dict(rows),
        "n_weights": weight_bytes // 4, "weight_bytes": weight_bytes,
        "copy_bytes": 2 * weight_bytes, "bandwidth": bandwidth,
        "bandwidth_floor": 3 * weight_bytes / bandwidth,
        "floors": benchmark.floors(weight_bytes, bandwidth),
        "skipped": {} if offload else {"update/swa_offload_every_step": "no host memory"},
        "own_bytes": weight_bytes,
    }


def test_floors_measures_and_json(tmp_path, capsys):
    # The floors, in weight-sized arrays: snapshot 3, ScheduleFree 2 (one
    # read and one write of y), window of 5: 7 (4 held + the weights read,
    # the mean and one slot written), offload 5 (copy 2 + snapshot 3).
    assert benchmark.floors(4_000_000, 1e9) == pytest.approx(
        {"snapshot": 0.012, "schedule_free": 0.008, "window": 0.028, "offload": 0.020}
    )
    results = synthetic()
    rows = benchmark.checks(results)
    ratios = {name: ratio for name, ratio, _ in rows}
    targets = {name: target for name, _, target in rows}
    expected = {
        "ScheduleFree extra / bandwidth floor (2 x weight bytes / copy bandwidth)": 2.0,
        "SWA window=5 snapshot extra / bandwidth floor (7 x weight bytes / copy bandwidth)": 1.25,
        "SWA offload snapshot extra / bandwidth floor (5 x weight bytes / copy bandwidth)": 0.5,
        "SWA offload snapshot extra / on-device snapshot extra": 1.0,
    }
    for name, ratio in expected.items():
        assert ratios[name] == pytest.approx(ratio), name
        assert targets[name] is None  # reported, no target
    benchmark.print_report(results, rows, rounds=1, steps=1)
    out = capsys.readouterr().out
    # 4 MB of weights moved in the 10 ms extra: 0.4 GB/s; the copy row
    # copies them at 4 MB / 8 ms = 0.5 GB/s.
    assert "at 0.40 GB/s effective" in out and "at 0.50 GB/s" in out
    assert out.count("report") >= len(expected)
    path = tmp_path / "bench.json"
    benchmark.write_json(str(path), results, rows, rounds=1, steps=1)
    report = json.loads(path.read_text())
    assert report["floor_arrays"] == {"snapshot": 3, "schedule_free": 2, "window": 7, "offload": 5}
    assert report["floors_seconds"]["window"] == pytest.approx(0.028)
    assert report["offload_effective_gb_per_s"] == pytest.approx(0.4)
    assert report["skipped"] == {}
    checks = {c["measure"]: c for c in report["checks"]}
    for name, ratio in expected.items():
        assert checks[name]["ratio"] == pytest.approx(ratio)
        assert checks[name]["target"] is None and checks[name]["ok"] is None


def test_refused_offload_is_skipped_with_its_reason(tmp_path, capsys, monkeypatch):
    def refused():
        raise ValueError("no host memory")

    model = benchmark.build_model(4, 1, 2)
    factories = {"bare": lambda: keras.optimizers.SGD(0.01),
                 "swa_offload_every_step": refused}
    monkeypatch.setattr(benchmark, "update_optimizers", lambda: factories)
    variants, _, skipped = benchmark.update_variants(model)
    assert skipped == {"update/swa_offload_every_step": "no host memory"}
    assert "swa_offload_every_step" not in variants
    # Any other row that fails fails the run.
    factories = {"bare": refused}
    with pytest.raises(ValueError, match="no host memory"):
        benchmark.update_variants(model)

    results = synthetic(offload=False)
    rows = benchmark.checks(results)
    assert not [name for name, _, _ in rows if "offload" in name]
    benchmark.print_report(results, rows, rounds=1, steps=1)
    assert "Skipped update/swa_offload_every_step: no host memory" in capsys.readouterr().out
    path = tmp_path / "bench.json"
    benchmark.write_json(str(path), results, rows, rounds=1, steps=1)
    report = json.loads(path.read_text())
    assert report["skipped"] == {"update/swa_offload_every_step": "no host memory"}
    assert report["offload_effective_gb_per_s"] is None

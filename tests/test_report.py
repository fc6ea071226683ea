"""Run plots: each writes a real PNG from synthetic inputs, whatever optional trajectory columns are missing."""

import csv

import numpy as np
import pytest

from guidance.app.plots import plot_map_slice, plot_trajectory, plot_weights

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def synthetic_trajectory(n_steps: int = 40, with_ess: bool = True) -> list[dict]:
    sigmas = 160.0 * (np.linspace(1.0, 0.0, n_steps) ** 7) + 0.01
    rows = []
    for i, s in enumerate(sigmas):
        row = {"step": i, "sigma": s, "loglik_density": -1e5 * s / 160.0 - 50.0, "loglik_saxs": -3e3 * s / 160.0 - 5.0}
        if with_ess:
            row["ess"] = 1.0 if i % 10 == 0 else 0.5 + 0.4 * np.cos(i)
            if i % 10 == 0:
                row["resampled"] = 1  # present on some rows only, as FK writes it
        rows.append(row)
    return rows


def test_plot_trajectory_from_rows(tmp_path):
    out = plot_trajectory(synthetic_trajectory(), tmp_path / "plots" / "trajectory.png")
    assert out == tmp_path / "plots" / "trajectory.png"
    assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["trajectory.png"]  # no temporary file left behind


def test_plot_trajectory_from_csv_without_ess(tmp_path):
    rows = synthetic_trajectory(with_ess=False)
    rows[3]["loglik_saxs"] = float("nan")
    path = tmp_path / "trajectory.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert_png(plot_trajectory(path, tmp_path / "trajectory.png"))
    assert_png(plot_trajectory(str(path), tmp_path / "trajectory_str.png"))


def test_plot_trajectory_with_empty_ess_cells_and_particle_count(tmp_path):
    rows = synthetic_trajectory()
    for r in rows:
        r["ess"] = "" if r["step"] % 2 else r["ess"] * 8
        r["n_particles"] = 8
    assert_png(plot_trajectory(rows, tmp_path / "t.png"))


def test_plot_trajectory_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_trajectory(tmp_path / "nope.csv", tmp_path / "t.png")


def gaussian_blob(shape, centre, width):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * width**2))


def test_plot_map_slice(tmp_path):
    shape = (24, 20, 16)
    rng = np.random.default_rng(0)
    model = gaussian_blob(shape, np.array([10.0, 8.0, 6.0]), 2.0)
    data = model + 0.1 * rng.normal(size=shape)
    origin, spacing = np.array([-5.0, 2.0, 10.0]), np.array([0.8, 0.8, 0.8])
    atoms = origin + np.array([[10.0, 8.0, 6.0], [11.0, 9.0, 6.5], [3.0, 3.0, 14.0]]) * spacing
    out = plot_map_slice(data, model, origin, spacing, tmp_path / "map.png", atoms_xyz=atoms)
    assert_png(out)
    for axis in (0, 1):
        assert_png(plot_map_slice(data, model, origin, 0.8, tmp_path / f"map{axis}.png", axis=axis, index=3,
                                  title="custom"))


def test_plot_map_slice_of_an_empty_model(tmp_path):
    shape = (8, 8, 8)
    assert_png(plot_map_slice(np.random.default_rng(1).normal(size=shape), np.zeros(shape), [0, 0, 0], [1, 1, 1],
                              tmp_path / "empty.png"))


def test_plot_weights(tmp_path):
    before = np.full(5, 0.2)
    after = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    assert_png(plot_weights(before, after, tmp_path / "weights.png"))
    assert_png(plot_weights(before, after, tmp_path / "weights_labels.png", labels=list("ABCDE")))
    with pytest.raises(ValueError):
        plot_weights(before, after[:3], tmp_path / "bad.png")

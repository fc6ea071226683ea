"""Plots of a run: the guidance trajectory, a map slice with the model density, member weights.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas (no pyplot, no display, no global
state) and written atomically: to a temporary file in the destination folder, then renamed over ``out_path``, so a
reader never sees a half-written image.  Every function returns the path it wrote.
"""

from __future__ import annotations

import csv
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

LOGLIK_PREFIX = "loglik_"


def _new_figure(width: float, height: float, **kwargs) -> Figure:
    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fmt = out_path.suffix.lstrip(".").lower() or "png"
    # A unique sibling name (not mkstemp, whose 0600 mode would survive the rename): savefig creates it normally.
    tmp = out_path.with_name(f".{out_path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.{fmt}")
    try:
        fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


# --------------------------------------------------------------------------------------------------------------------
# Trajectory
# --------------------------------------------------------------------------------------------------------------------


def _to_float(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str):
        value = value.strip()
        if value == "" or value.lower() in ("nan", "none", "null"):
            return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _read_trajectory(trajectory: Iterable[Mapping[str, Any]] | str | os.PathLike) -> dict[str, np.ndarray]:
    """Rows (dicts or a trajectory.csv) -> one float column per key; missing entries are NaN."""
    if isinstance(trajectory, (str, os.PathLike)):
        path = Path(trajectory)
        if not path.is_file():
            raise FileNotFoundError(f"trajectory file {path} does not exist")
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = [dict(r) for r in trajectory]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: np.array([_to_float(r.get(k)) for r in rows], dtype=np.float64) for k in keys}


def _has_data(x: np.ndarray | None) -> bool:
    return x is not None and bool(np.any(np.isfinite(x)))


def plot_trajectory(trajectory: Sequence[Mapping[str, Any]] | str | os.PathLike, out_path) -> Path:
    """Two stacked panels against the sampler step: the log-likelihood of each observable (``loglik_<name>`` columns,
    with the noise level ``sigma`` on a log-scaled right axis) and the FK effective sample size.

    ``ess`` is drawn as the fraction ESS/P when a particle count column (``n_particles`` or ``P``) is present or the
    values are already fractions; otherwise as recorded.  Steps with ``resampled`` > 0 are marked with dotted lines.
    Missing ``ess``/``sigma``/``resampled`` columns or NaN entries are fine.
    """
    cols = _read_trajectory(trajectory)
    n_rows = len(next(iter(cols.values()))) if cols else 0
    step = cols.get("step") if _has_data(cols.get("step")) else np.arange(n_rows, dtype=float)
    loglik_keys = [k for k in cols if k.startswith(LOGLIK_PREFIX)]

    fig = _new_figure(7.0, 6.0)
    ax_ll, ax_ess = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})

    finite_ll = []
    for key in loglik_keys:
        y = cols[key]
        ok = np.isfinite(y)
        if ok.any():
            ax_ll.plot(step[ok], y[ok], label=key[len(LOGLIK_PREFIX):], lw=1.5)
            finite_ll.append(y[ok])
    if finite_ll:
        magnitudes = np.abs(np.concatenate(finite_ll))
        big, small = magnitudes.max(), magnitudes[magnitudes > 0].min() if np.any(magnitudes > 0) else 1.0
        if big / max(small, 1e-12) > 1e3:  # values spanning decades: keep the late (small) ones readable
            ax_ll.set_yscale("symlog", linthresh=max(small, 1e-3 * big, 1e-6))
    else:
        ax_ll.text(0.5, 0.5, "no log-likelihood recorded", ha="center", va="center", transform=ax_ll.transAxes)
    ax_ll.set_ylabel("log-likelihood")
    ax_ll.grid(alpha=0.3)

    sigma = cols.get("sigma")
    handles, labels = ax_ll.get_legend_handles_labels()
    if _has_data(sigma) and np.any(sigma > 0):
        ok = np.isfinite(sigma) & (sigma > 0)
        ax_sigma = ax_ll.twinx()
        (line,) = ax_sigma.plot(step[ok], sigma[ok], color="0.4", ls="--", lw=1.0)
        ax_sigma.set_yscale("log")
        ax_sigma.set_ylabel("sigma (Å)")
        handles, labels = handles + [line], labels + ["sigma"]
    if handles:
        ax_ll.legend(handles, labels, loc="best", fontsize="small")

    ess = cols.get("ess")
    if _has_data(ess):
        n_particles = next((cols[k] for k in ("n_particles", "P") if _has_data(cols.get(k))), None)
        ylabel = "ESS"
        if n_particles is not None:
            ess, ylabel = ess / n_particles, "ESS / P"
        elif np.nanmax(ess) <= 1.0 + 1e-9:
            ylabel = "ESS / P"
        ok = np.isfinite(ess)
        ax_ess.plot(step[ok], ess[ok], color="C3", marker=".", ms=3, lw=1.0)
        if ylabel == "ESS / P":
            ax_ess.set_ylim(0.0, 1.05)
        resampled = cols.get("resampled")
        if _has_data(resampled) and np.any(resampled > 0):
            for s in step[np.nan_to_num(resampled) > 0]:
                ax_ess.axvline(s, color="0.6", lw=0.6, ls=":")
            ax_ess.plot([], [], color="0.6", lw=0.6, ls=":", label="resampled")
            ax_ess.legend(loc="lower right", fontsize="small")
        ax_ess.set_ylabel(ylabel)
    else:
        ax_ess.text(0.5, 0.5, "no FK steering (ESS not recorded)", ha="center", va="center",
                    transform=ax_ess.transAxes, color="0.4")
        ax_ess.set_yticks([])
    ax_ess.set_xlabel("step")
    ax_ess.grid(alpha=0.3)
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------------------------------------
# Map slice
# --------------------------------------------------------------------------------------------------------------------


def plot_map_slice(
    map_values,
    model_values,
    origin,
    spacing,
    out_path,
    *,
    axis: int = 2,
    index: int | None = None,
    atoms_xyz: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """A plane of the experimental map (grey image) with the model density as contours at mean + 1 and 2 standard
    deviations of the model in the plane, and the atoms within 1 A of the plane as points.

    The grids are ``[nx, ny, nz]`` on orthogonal axes: grid point ``(i, j, k)`` sits at ``origin + (i, j, k) *
    spacing`` (A).  The plane is ``index`` along ``axis``; by default the one where the model density is largest.
    """
    rho = np.asarray(map_values, dtype=np.float64)
    model = np.asarray(model_values, dtype=np.float64)
    if rho.ndim != 3 or model.shape != rho.shape:
        raise ValueError(f"map {rho.shape} and model {model.shape} must be 3-d grids of the same shape")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2; got {axis}")
    origin = np.broadcast_to(np.asarray(origin, dtype=np.float64), (3,))
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    if index is None:
        other = tuple(a for a in range(3) if a != axis)
        index = int(np.argmax(np.nansum(model, axis=other)))
    if not 0 <= index < rho.shape[axis]:
        raise ValueError(f"slice index {index} is outside the grid (0..{rho.shape[axis] - 1} along axis {axis})")

    u_ax, v_ax = (a for a in range(3) if a != axis)  # in-plane axes: u horizontal, v vertical
    rho_2d = np.take(rho, index, axis=axis)  # [n_u, n_v]
    model_2d = np.take(model, index, axis=axis)
    u = origin[u_ax] + spacing[u_ax] * np.arange(rho.shape[u_ax])
    v = origin[v_ax] + spacing[v_ax] * np.arange(rho.shape[v_ax])
    plane = origin[axis] + spacing[axis] * index
    names = "xyz"

    fig = _new_figure(6.0, 5.5)
    ax = fig.subplots()
    half_u, half_v = spacing[u_ax] / 2, spacing[v_ax] / 2
    image = ax.imshow(rho_2d.T, origin="lower", cmap="Greys", interpolation="nearest", aspect="equal",
                      extent=(u[0] - half_u, u[-1] + half_u, v[0] - half_v, v[-1] + half_v))
    fig.colorbar(image, ax=ax, shrink=0.8, label="map")

    legend: list = []
    finite = model_2d[np.isfinite(model_2d)]
    if finite.size and finite.std() > 0 and len(u) > 1 and len(v) > 1:
        mean, std = finite.mean(), finite.std()
        styles = [(1.0, "tab:blue", 1.0), (2.0, "tab:red", 1.5)]  # (sigma multiple, colour, line width)
        styles = [st for st in styles if mean + st[0] * std < finite.max()]
        if styles:
            ax.contour(u, v, model_2d.T, levels=[mean + k * std for k, _, _ in styles],
                       colors=[c for _, c, _ in styles], linewidths=[w for _, _, w in styles])
            legend += [Line2D([], [], color=c, lw=w, label=f"model mean + {k:g} sd") for k, c, w in styles]

    if atoms_xyz is not None:
        xyz = np.asarray(atoms_xyz, dtype=np.float64).reshape(-1, 3)
        near = np.abs(xyz[:, axis] - plane) <= 1.0
        if near.any():
            legend.append(ax.scatter(xyz[near, u_ax], xyz[near, v_ax], s=12, c="tab:orange", edgecolors="k",
                                     linewidths=0.4, zorder=3, label="atoms within 1 Å"))
    if legend:
        ax.legend(handles=legend, loc="upper right", fontsize="small")

    ax.set_xlabel(f"{names[u_ax]} (Å)")
    ax.set_ylabel(f"{names[v_ax]} (Å)")
    ax.set_title(title if title is not None else f"{names[axis]} = {plane:.2f} Å (index {index})")
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------------------------------------
# Member weights
# --------------------------------------------------------------------------------------------------------------------


def plot_weights(before, after, out_path, labels: Sequence[str] | None = None) -> Path:
    """Grouped bar chart of the member weights before and after refinement."""
    before = np.asarray(before, dtype=np.float64).reshape(-1)
    after = np.asarray(after, dtype=np.float64).reshape(-1)
    if before.shape != after.shape:
        raise ValueError(f"before has {before.size} weights but after has {after.size}")
    n = before.size
    labels = [str(i) for i in range(n)] if labels is None else [str(x) for x in labels]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} members")

    fig = _new_figure(max(4.0, min(0.35 * n + 2.0, 16.0)), 3.5)
    ax = fig.subplots()
    x = np.arange(n)
    width = 0.4
    ax.bar(x - width / 2, before, width, label="before", color="0.6")
    ax.bar(x + width / 2, after, width, label="after", color="tab:blue")
    if n <= 40:
        ax.set_xticks(x, labels, rotation=90 if max(map(len, labels), default=0) > 3 else 0)
    ax.set_xlabel("member")
    ax.set_ylabel("weight")
    ax.set_ylim(0.0, max(1e-3, float(np.nanmax(np.r_[before, after]))) * 1.1)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_path)


def plot_r_by_resolution(bins: Sequence[Mapping[str, Any]], out_path, title: str = "") -> Path:
    """R-work and R-free per resolution bin (``bins``: dicts with d_max, d_min, r_work, r_free, n_free as in
    ``observables.xray`` reports), against 1/d^2 at the bin centres, as crystallographers read refinement logs."""
    centres = np.array([0.5 * (1.0 / b["d_max"] ** 2 + 1.0 / b["d_min"] ** 2) for b in bins])
    fig = _new_figure(5.5, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(centres, [b["r_work"] for b in bins], "o-", label="R-work")
    r_free = np.array([_to_float(b.get("r_free")) for b in bins])
    if np.isfinite(r_free).any():
        ax.plot(centres, r_free, "s--", label="R-free")
    ticks = centres[:: max(1, len(centres) // 6)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{1.0 / math.sqrt(c):.2f}" for c in ticks])
    ax.set_xlabel("resolution (A)")
    ax.set_ylabel("R")
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return _save(fig, out_path)


def plot_saxs_fit(q, intensity, sigma, model, out_path, title: str = "",
                  guinier: Mapping[str, Any] | None = None) -> Path:
    """A SAXS fit as it is read: log I(q) of the data with error bars and the fitted model above the normalised
    residuals (I - I_model) / sigma, and a Kratky plot q^2 I(q) of both beside them (q in 1/A, I in the data's units;
    ``model`` is the fitted c I_model at the data's q).  ``guinier`` (optional, the observable's report["guinier"]:
    q_min, q_max, rg) shades the data's Guinier range on the log panel."""
    q = np.asarray(q, dtype=np.float64).reshape(-1)
    intensity = np.asarray(intensity, dtype=np.float64).reshape(-1)
    sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
    model = np.asarray(model, dtype=np.float64).reshape(-1)
    if not (q.size == intensity.size == sigma.size == model.size):
        raise ValueError(f"q, intensity, sigma and model differ in length ({q.size}, {intensity.size}, {sigma.size}, "
                         f"{model.size})")
    fig = _new_figure(10.0, 5.5)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1], width_ratios=[1.25, 1], hspace=0.05, wspace=0.32)
    ax = fig.add_subplot(grid[0, 0])
    res = fig.add_subplot(grid[1, 0], sharex=ax)
    kratky = fig.add_subplot(grid[:, 1])

    pos = intensity > 0  # a log axis shows the positive points; residuals and Kratky show them all
    ax.errorbar(q[pos], intensity[pos], yerr=np.minimum(sigma[pos], 0.999 * intensity[pos]), fmt=".", ms=3,
                color="0.35", ecolor="0.75", elinewidth=0.8, label="data")
    ax.plot(q, model, "-", color="tab:red", lw=1.4, label="fit")
    ax.set_yscale("log")
    if pos.any():  # error bars reaching towards 0 would stretch the log axis over decades of nothing
        top = max(float(intensity[pos].max()), float(model[model > 0].max()) if (model > 0).any() else 0.0)
        ax.set_ylim(0.5 * float(np.percentile(intensity[pos], 1)), 2.0 * top)
    ax.set_ylabel("I(q)")
    if guinier and all(_has_data(np.array([_to_float(guinier.get(k))])) for k in ("q_min", "q_max")):
        label = "Guinier range"
        if _has_data(np.array([_to_float(guinier.get("rg"))])):
            label += f" (Rg {float(guinier['rg']):.1f} A)"
        ax.axvspan(float(guinier["q_min"]), float(guinier["q_max"]), color="tab:green", alpha=0.12, label=label)
    ax.legend(frameon=False, fontsize="small")
    ax.tick_params(labelbottom=False)
    if title:
        ax.set_title(title)

    ok = sigma > 0
    res.axhline(0.0, color="0.5", lw=0.8)
    res.plot(q[ok], (intensity[ok] - model[ok]) / sigma[ok], ".", ms=3, color="tab:blue")
    res.set_xlabel("q (1/A)")
    res.set_ylabel("(I - fit) / sigma")

    kratky.plot(q, q**2 * intensity, ".", ms=3, color="0.35", label="data")
    kratky.plot(q, q**2 * model, "-", color="tab:red", lw=1.4, label="fit")
    kratky.set_xlabel("q (1/A)")
    kratky.set_ylabel("q^2 I(q)")
    kratky.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    kratky.set_title("Kratky", fontsize="medium")
    kratky.legend(frameon=False, fontsize="small")
    for a in (ax, res, kratky):
        a.grid(alpha=0.3)
    return _save(fig, out_path)


DRAWERS = {
    "map_slice": lambda data, path: plot_map_slice(data["map"], data["model"], data["origin"], data["spacing"], path,
                                                   atoms_xyz=data.get("atoms_xyz"), title=data.get("title")),
    "saxs_fit": lambda data, path: plot_saxs_fit(data["q"], data["intensity"], data["sigma"], data["model"], path,
                                                 title=data.get("title", ""), guinier=data.get("guinier")),
    "r_by_resolution": lambda data, path: plot_r_by_resolution(data["bins"], path, title=data.get("title", "")),
}


def draw(spec, plots: Path) -> Path:
    """Draw an observable's ``PlotSpec`` into ``plots/<spec.name>``."""
    if spec.kind not in DRAWERS:
        raise ValueError(f"plot {spec.name}: unknown kind {spec.kind!r}; the app draws {sorted(DRAWERS)}")
    return DRAWERS[spec.kind](spec.data, plots / spec.name)

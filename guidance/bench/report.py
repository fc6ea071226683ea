"""ensemble-bench's aggregation: one row per job (results.csv), the summary tables (report.md) and plots."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np

from guidance.bench.manifest import GRID_KEYS

log = logging.getLogger("ensemble_bench")


ROW_KEYS = ("status", "rscc_region", "cc_box", "r_work", "r_free", "ab_region_rmsd", "best_rmsd_A", "best_rmsd_B",
            "recovered_A", "recovered_B", "fraction_A", "fraction_B", "fraction_error_B", "lddt_A", "lddt_B",
            "bond_rmsz", "angle_rmsz", "clashes_per_1000_atoms", "n_atoms", "n_region_atoms", "sampling_s", "wall_s",
            "error")


def collect(out_dir: Path, keys: list[str] | None = None) -> list[dict]:
    """One row per job (the tidy results table): the cell's values, then ``ROW_KEYS``."""
    rows = []
    for path in sorted((out_dir / "results").glob("*.json")):
        rec = json.loads(path.read_text())
        if keys is not None and rec["key"] not in keys:
            continue
        row = {"key": rec["key"], "observables": "density", **rec["cell"]}
        metrics = rec.get("metrics", {})
        for k in ROW_KEYS:
            row[k] = rec.get(k) if k in ("status", "wall_s", "error") else metrics.get(k)
        rows.append(row)
    return rows


def write_report(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """``results.csv`` (every job), ``report.md`` (summary tables) and ``plots/{tradeoff,recovery}.png``."""
    from guidance.structures.io import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["key", *GRID_KEYS, *ROW_KEYS]

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    paths = {"csv": atomic_write(out_dir / "results.csv", buf.getvalue())}

    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    md = ["# ensemble-bench report", "", f"{len(rows)} jobs: {len(ok)} finished, {len(failed)} failed.", ""]
    md += ["## Recovery of altloc B by method", "",
           "Entries in which some member came within the recovery threshold of B (over the altloc regions, after "
           "superposition on the rest of the chain), per predictor / guidance / observables / strength / "
           "potentials.", "",
           "Jobs: the same over every job of the group (seeds, occupancies, ensemble sizes), a less noisy count.", "",
           "Observables: the data the jobs were guided by.  Whatever guided a job, RSCC is against the map (the "
           "synthetic map of the job's occupancy unless the entry gives one) and R-free against the synthetic "
           "amplitudes of that occupancy (empty: the entry has an experimental map and no amplitudes).", "",
           "| predictor | guidance | observables | strength | potentials | entries with B recovered "
           "| jobs with B recovered | mean best RMSD to B (A) | mean B fraction error | mean RSCC (region) "
           "| mean R-free | mean bond RMSZ | mean angle RMSZ | clashes /1000 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r["predictor"], r["guidance"], r["observables"], r["strength"], r["potentials"]),
                          []).append(r)

    def mean(rs, k):
        vals = [float(r[k]) for r in rs if r.get(k) is not None and np.isfinite(float(r[k]))]
        return float(np.mean(vals)) if vals else float("nan")

    for (pred, guid, obs, strength, pots), rs in sorted(groups.items()):
        recovered = sorted({r["entry"] for r in rs if r["recovered_B"]})
        entries = sorted({r["entry"] for r in rs})
        md.append(f"| {pred} | {guid} | {obs} | {strength:g} | {pots} | {len(recovered)}/{len(entries)} "
                  f"({', '.join(recovered) or '-'}) | {sum(bool(r['recovered_B']) for r in rs)}/{len(rs)} "
                  f"| {mean(rs, 'best_rmsd_B'):.2f} | {mean(rs, 'fraction_error_B'):.2f}"
                  f" | {mean(rs, 'rscc_region'):.3f} | {_fmt_r(mean(rs, 'r_free'))} | {mean(rs, 'bond_rmsz'):.2f} "
                  f"| {mean(rs, 'angle_rmsz'):.2f} | {mean(rs, 'clashes_per_1000_atoms'):.1f} |")
    md += ["", "## Per entry", "",
           "| entry | A-B RMSD (A) | predictor | guidance | observables | E | strength | b | potentials | seed "
           "| best RMSD B | recovered B | fraction B | LDDT B | RSCC region | CC box | R-work | R-free | bond RMSZ "
           "| angle RMSZ | wall (s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(ok, key=lambda r: (r["entry"], r["predictor"], r["guidance"], r["observables"], r["strength"],
                                       r["occupancy"])):
        md.append(f"| {r['entry']} | {_fmt(r['ab_region_rmsd'])} | {r['predictor']} | {r['guidance']} | "
                  f"{r['observables']} | {r['ensemble_size']} | {r['strength']:g} | {r['occupancy']:g} | "
                  f"{r['potentials']} | {r['seed']} | {_fmt(r['best_rmsd_B'])} | {'yes' if r['recovered_B'] else 'no'} | "
                  f"{_fmt(r['fraction_B'])} | {_fmt(r['lddt_B'], '.3f')} | {_fmt(r['rscc_region'], '.3f')} | "
                  f"{_fmt(r['cc_box'], '.3f')} | "
                  f"{_fmt_r(r['r_work'])} | {_fmt_r(r['r_free'])} | {_fmt(r['bond_rmsz'])} | "
                  f"{_fmt(r['angle_rmsz'])} | {r['wall_s']:.1f} |")
    if failed:
        md += ["", "## Failed jobs", "", "| job | error |", "|---|---|"]
        md += [f"| {r['key']} | {str(r['error']).replace('|', '/')[:300]} |" for r in failed]
    try:
        paths.update(_plots(ok, out_dir / "plots"))
        md += ["", "## Plots", "", "![data fit vs geometry](plots/tradeoff.png)", "",
               "![recovery vs strength](plots/recovery.png)"]
    except Exception as exc:  # a missing plotting backend must not lose the tables
        log.warning("plots not written: %s", exc)
    paths["report"] = atomic_write(out_dir / "report.md", "\n".join(md) + "\n")
    return paths


def _fmt(v, spec: str = ".2f") -> str:
    """A number for the tables: "-" when there is none (metrics.json writes NaN as null)."""
    return "-" if v is None or not np.isfinite(float(v)) else format(float(v), spec)


def _fmt_r(v) -> str:
    """An R value or a mean of them: "-" when there is none (no amplitudes), never 0."""
    return "-" if v is None or not np.isfinite(float(v)) else f"{float(v):.3f}"


def _plots(rows: list[dict], plots: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    out = {}
    # the trade-off: data fit (RSCC over the regions) against the geometry penalty (bond RMSZ), per method
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["predictor"], r["guidance"], r["potentials"], r.get("observables", "density")),
                          []).append(r)

    def label_of(pred, guid, pots, obs):
        return f"{pred}/{guid}" + ("" if pots == "none" else f"+{pots}") + ("" if obs == "density" else f" [{obs}]")

    for (pred, guid, pots, obs), rs in sorted(groups.items()):
        label = label_of(pred, guid, pots, obs)
        x = np.array([np.nan if r["bond_rmsz"] is None else float(r["bond_rmsz"]) for r in rs])
        y = np.array([np.nan if r["rscc_region"] is None else float(r["rscc_region"]) for r in rs])
        sc = ax.scatter(x, y, alpha=0.25, s=14)  # every job, faint
        strengths = sorted({float(r["strength"]) for r in rs})
        s_of = np.array([float(r["strength"]) for r in rs])
        mx = [np.nanmean(x[s_of == v]) for v in strengths]
        my = [np.nanmean(y[s_of == v]) for v in strengths]
        ax.plot(mx, my, "o-", color=sc.get_facecolor()[0][:3], label=label)  # the mean over entries per strength
        for v, xi, yi in zip(strengths, mx, my):
            ax.annotate(f"{v:g}", (xi, yi), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bond-length RMSZ (Engh & Huber)")
    ax.set_ylabel("RSCC over the altloc regions")
    ax.set_title("data fit vs geometry (mean per strength; faint: single jobs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out["tradeoff"] = plots / "tradeoff.png"
    fig.savefig(out["tradeoff"], dpi=120)
    plt.close(fig)
    # recovery of B vs strength
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (pred, guid, pots, obs), rs in sorted(groups.items()):
        by_s: dict[float, list[bool]] = {}
        for r in rs:
            by_s.setdefault(float(r["strength"]), []).append(bool(r["recovered_B"]))
        s = sorted(by_s)
        ax.plot(s, [np.mean(by_s[k]) for k in s], "o-", label=label_of(pred, guid, pots, obs))
    ax.set_xlabel("guidance strength (weight of the data term)")
    ax.set_ylabel("fraction of jobs with B recovered (<= 1 A)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out["recovery"] = plots / "recovery.png"
    fig.savefig(out["recovery"], dpi=120)
    plt.close(fig)
    return out


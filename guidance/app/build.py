"""Config -> objects: the predictor, the objective (observables + potentials), the guidance and sampler settings,
the atoms' extras taken from the input structure, and the embedded demo's inputs.  Nothing here names an
observable or a predictor: they come from their registries (observables.factory, guidance.app.predictors)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from observables.errors import InputError, unknown_option

log = logging.getLogger("ensemble_guide")


class UserError(InputError):
    """A problem with the user's input, reported as one line."""


def container(node) -> dict:
    """A config node as plain Python (resolved); {} for None."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


# ----------------------------------------------------------------------------------------------- the demo


def prepare_demo(cfg, out_dir: Path) -> tuple[Path, dict[str, Path]]:
    """Generate the embedded two-state case: the altloc structure (guidance.fixtures) and, for each selected
    observable that can make them (``synthetic_data``), synthetic data of the mixture -> (structure, {name: file})."""
    import observables
    from guidance.fixtures import build_two_state_peptide, write_two_state_structure
    from observables.base import AtomInfo

    occ = [float(v) for v in cfg.demo.occupancies]
    pep = build_two_state_peptide()
    inputs = out_dir / "inputs"
    structure = write_two_state_structure(inputs / "two_state.pdb", pep, occupancies=tuple(occ))
    atoms = AtomInfo.from_layout(pep.layout)
    states = np.stack([pep.coords_a, pep.coords_b])
    demo = {k: v for k, v in container(cfg.demo).items() if k not in ("occupancies", "prior_weights")}
    data: dict[str, Path] = {}
    for name in list(cfg.observables or []):
        make = getattr(observables.factory(name), "synthetic_data", None)
        if callable(make):
            data[name] = Path(make(atoms, states, occ, inputs, seed=int(cfg.seed), **demo))
    log.info("demo: %d-residue peptide, loop %s-%s in two states, synthetic data of the %.1f/%.1f mixture (%s) -> %s",
             len(pep.sequence), pep.loop[0], pep.loop[1], occ[0], occ[1], ", ".join(data) or "none", inputs)
    return Path(structure), data


# ----------------------------------------------------------------------------------------------- the prior


def build_predictor(cfg, conf):
    """The prior named by ``predictor.name`` (an entry point of ``ensemble_guide.predictors``), built for the input
    structure ``conf`` with the other ``predictor.*`` keys as its options."""
    from guidance.app.predictors import RunContext, build

    options = container(cfg.predictor)
    name = options.pop("name")
    run = RunContext(seed=int(cfg.seed), steps=int(cfg.sampler.steps), observables=tuple(cfg.observables or ()))
    return build(name, conf, run, options)


# ----------------------------------------------------------------------------------------------- the data


def structure_atoms(conf, layout=None, match=None, conformers=None) -> dict:
    """What the input structure says about the atoms beyond their positions, as ``AtomInfo`` fields: the conformers'
    weights, B-factors, occupancies, the crystal and the fixed atoms (waters, ligands, anything ``layout`` lacks).

    Score mode (``layout`` None: the structure's own atoms, evaluated as its K conformers): per-conformer B [K, N],
    anisotropic U [K, N, 6] and occupancies relative to the conformer weights [K, N], so that the weighted conformers
    are exactly the file's multiconformer model.  Sample mode (the predictor's ``layout`` and the ``match`` of the
    structure onto it): every sampled member carries the input's B per atom (the conformers' weighted mean;
    atoms the structure lacks take their residue's mean, else the overall mean) and the atom's total occupancy;
    members are moved, so anisotropic U does not apply.  ``conformers`` (ids) restricts the conformers' weights to
    those the prior is built from, so that nothing fitted to the reference coordinates (the X-ray observable's first
    bulk-solvent, scale and sigma_A fit) sees conformers the prior was not given (a benchmark's hidden altloc B)."""
    from guidance.structures.io import read_fixed_atoms
    from observables.base import Crystal, FixedAtoms

    weights = np.asarray(conf.weights, np.float64)
    if conformers:
        keep = np.isin(np.asarray(conf.ids), [str(c) for c in conformers])
        if keep.any():
            weights = np.where(keep, weights, 0.0) / np.sum(weights[keep])
    extras: dict = {"weights": weights.astype(np.float32)}
    if conf.crystal is not None:
        extras["crystal"] = Crystal(tuple(float(v) for v in conf.crystal[0]), str(conf.crystal[1]))
    target = conf.layout if layout is None else layout
    if conf.path is not None:
        fixed = read_fixed_atoms(conf.path, target.keys())
        counts = fixed.pop("counts")
        if len(fixed["element"]):
            extras["environment"] = FixedAtoms(**fixed)
            log.info("fixed atoms (not moved, seen by the data): %d waters and %d other atoms (ligands, ions, atoms the "
                     "model lacks), hydrogens left out", counts["water"], counts["other"])
    if conf.b_iso is None:
        return extras
    if layout is None:
        extras.update(b_iso=conf.b_iso, occupancy=conf.relative_occupancies(),
                      u_aniso=conf.u_aniso if conf.u_aniso is not None and np.any(conf.u_aniso) else None)
        return extras
    w = np.asarray(conf.weights, np.float64)
    b_conf = (w[:, None] * conf.b_iso).sum(0)
    b = np.full(len(layout), np.nan)
    b[match.dst_index] = b_conf[match.src_index]
    occ = np.ones(len(layout))
    if conf.occupancies is not None:
        occ[match.dst_index] = conf.occupancies.sum(0)[match.src_index]
    if np.isnan(b).any():  # an atom the structure lacks: its residue's mean B, else the overall mean
        residue = layout.residue_index()
        overall = float(np.nanmean(b)) if np.isfinite(b).any() else 20.0
        for r in np.unique(residue[np.isnan(b)]):
            known = b[(residue == r) & np.isfinite(b)]
            b[(residue == r) & np.isnan(b)] = float(np.mean(known)) if known.size else overall
    extras.update(b_iso=b.astype(np.float32), occupancy=occ.astype(np.float32))
    return extras


def build_objective(cfg, layout, ref_coords, demo_data: dict[str, Path] | None = None, extras: dict | None = None):
    """The observables selected in ``cfg.observables``, built on the atoms of ``layout`` (the predictor's, or the
    structure's in score mode) with the input structure's conformers ``ref_coords [K, N, 3]`` in that order and the
    ``extras`` of ``structure_atoms`` (B-factors, occupancies, crystal, fixed atoms) -> [Term]."""
    import observables
    from guidance.objective import Term
    from observables.base import AtomInfo

    atoms = AtomInfo.from_layout(layout, coords=ref_coords, **(extras or {}))
    terms = []
    for name in cfg.observables or {}:
        params = container(cfg.observables[name])
        weight = float(params.pop("weight", 1.0))
        factory = observables.factory(name)
        key = getattr(factory, "data_key", "data")
        if key in params and params[key] is None:
            if name not in (demo_data or {}):
                raise UserError(f"observables.{name}.{key} is required: give the data file")
            params[key] = demo_data[name]
        try:
            obs = factory(atoms, **params)
        except InputError as exc:  # a bad data file or option value: the reader's message names it
            text = str(exc)
            raise UserError(text if text.startswith(f"observables.{name}") else f"observables.{name}: {text}") from exc
        except OSError as exc:  # unreadable file (permissions, a directory, ...)
            raise UserError(f"observables.{name}: {exc}") from exc
        except TypeError as exc:  # an option the observable does not take
            option = unknown_option(exc)
            if option is None:
                raise
            raise UserError(f"observables.{name}.{option} is not an option of the {name} observable; its options "
                            f"are in `ensemble-guide --cfg job observables=[{name}]`") from exc
        terms.append(Term(name, obs, weight))
        log.info("observable %s (weight %.3g): %s", name, weight,
                 {k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()})
        describe = getattr(obs, "describe", None)
        for line in (describe() if callable(describe) else []):
            log.info("%s: %s", name, line)
        for note in getattr(obs, "notes", []) or []:
            log.info("%s: %s", name, note)
    if not terms:
        raise UserError("no observables selected: use e.g. observables=[density]")
    return terms


def build_potentials(cfg, predictor) -> list:
    """The prior-side potentials selected in ``cfg.potentials`` (e.g. ``potentials=[boltz]``), built for
    ``predictor`` (guidance.app.potentials).  With none selected, a run on a real structure (``structure`` set) gets
    the geometry potential at its defaults (``geometry_potential=auto``; false turns that off): sampled members of
    a real structure are judged by their covalent geometry (bond / angle RMSZ <= 2), the demo is not."""
    from guidance.app.potentials import BUILDERS, build
    from guidance.objective import PotentialTerm

    out = []
    chosen = {name: container(cfg.potentials[name]) for name in cfg.get("potentials") or {}}
    auto = cfg.get("geometry_potential", "auto")
    if auto not in ("auto", False):
        raise UserError(f"geometry_potential must be auto or false, got {auto!r}")
    if not chosen and auto == "auto" and cfg.get("structure") is not None:
        chosen = {"geometry": {"weight": 1.0, **BUILDERS["geometry"].options()}}
        log.info("potential geometry added: a real structure samples with ideal geometry (geometry_potential=auto; "
                 "potentials=[...] chooses others, geometry_potential=false none)")
    for name, params in chosen.items():
        weight = float(params.pop("weight", 1.0))
        energy_and_grad, description = build(name, predictor, params)
        out.append(PotentialTerm(name, energy_and_grad, weight))
        log.info("potential %s (weight %.3g): %s", name, weight, description)
    return out


# ----------------------------------------------------------------------------------------------- the sampler


def schedule_of(predictor, scfg):
    """The predictor's noise schedule with the ``sampler.*`` overrides that are set."""
    from predictors.base import NoiseSchedule

    names = [f for f in NoiseSchedule.__dataclass_fields__ if f != "sigma_data"]
    overrides = {k: float(scfg[k]) for k in names if scfg.get(k) is not None}
    return predictor.schedule.replace(**overrides) if overrides else predictor.schedule


def sampling_of(predictor, scfg):
    """``guidance.sampler.Sampling`` from ``sampler.*``: ``auto`` augmentation / alignment follow the predictor."""
    from guidance.sampler import Sampling

    augmentation = (bool(getattr(predictor, "needs_augmentation", False)) if scfg.augmentation == "auto"
                    else bool(scfg.augmentation))
    needs_alignment = bool(getattr(predictor, "needs_alignment", False))
    align = needs_alignment if scfg.align == "auto" else bool(scfg.align)
    try:
        return Sampling(solver=str(scfg.solver), augmentation=augmentation, align=align,
                        n_steps_total=int(scfg.steps))
    except ValueError as exc:
        raise UserError(f"sampler.solver: {exc}") from exc


def guidance_of(gcfg):
    """(DPS or None, FK or None) from ``guidance.*``."""
    from guidance.dps import DPS, Strength
    from guidance.fk import FK

    method = gcfg.method
    if method not in ("none", "dps", "fk"):
        raise UserError(f"unknown guidance method {method!r}; use guidance=none, dps or fk")
    dps = fk = None
    try:
        if method in ("dps", "fk") and gcfg.get("dps") is not None and float(gcfg.dps.strength) > 0:
            d = container(gcfg.dps)
            strength = Strength(float(d.pop("strength")), d.pop("schedule"), float(d.pop("start")), float(d.pop("end")))
            dps = DPS(strength=strength, **d)
        if method == "fk":
            fk = FK(particles=int(gcfg.particles), **container(gcfg.fk))
    except (ValueError, TypeError) as exc:
        raise UserError(f"guidance: {exc}") from exc
    return dps, fk


def refinement_data(objective, model):
    """The observables of ``objective`` that a multiconformer ``model`` can be refined against (those with
    ``atoms(elements, b_iso)``: the X-ray amplitudes), as one ``guidance.refine.DataSum``; None when there are none."""
    from guidance.refine import DataSum

    elements = np.asarray(model.layout.element)[model.atom]
    parts = {t.name: (float(t.weight), t.observable.atoms(elements, model.b_factor)) for t in objective.terms
             if callable(getattr(t.observable, "atoms", None))}
    return DataSum(parts) if parts else None

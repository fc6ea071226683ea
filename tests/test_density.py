"""Physics and I/O checks of the real-space density observable (CPU, small systems)."""

from __future__ import annotations

from pathlib import Path

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from observables.base import AtomInfo, Observable, build
from observables.density import (
    DensityKernel,
    DensityMap,
    DensityObservable,
    MapError,
    atom_density,
    form_factor_coefficients,
    read_map,
    resolution_blur,
    synthetic_map,
    write_ccp4,
)

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
AWA = SHARED_DATA / "structures" / "multiconf-peptides" / "AWA_single.pdb"


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------


def chain_atoms(n: int, seed: int = 0, elements=("C", "N", "O", "C", "S")) -> tuple[np.ndarray, np.ndarray]:
    """A compact random chain (1.5 A steps) of ``n`` atoms: elements [n], coords [n, 3] (A)."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(size=(n, 3))
    steps *= 1.5 / np.linalg.norm(steps, axis=1, keepdims=True)
    coords = np.cumsum(steps, axis=0) + 10.0
    return np.array([elements[i % len(elements)] for i in range(n)]), coords.astype(np.float32)


def atom_info(elements: np.ndarray, coords: np.ndarray | None) -> AtomInfo:
    n = len(elements)
    return AtomInfo(
        element=np.asarray(elements),
        atom_name=np.asarray(elements),
        res_name=np.full(n, "UNK"),
        res_seq=np.arange(1, n + 1),
        chain_id=np.full(n, "A"),
        coords=None if coords is None else np.asarray(coords, np.float32).reshape(-1, n, 3),
    )


def box(coords: np.ndarray, spacing: float, padding: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    lo = np.floor((coords.min(0) - padding) / spacing) * spacing
    shape = tuple(int(s) for s in np.ceil((coords.max(0) + padding - lo) / spacing) + 1)
    return lo, shape


def gemmi_density(elements, coords, b_iso, occupancies, origin, shape, spacing, blur, kind="xray") -> np.ndarray:
    """gemmi's DensityCalculator on a P1 cell equal to the box (grid point (i,j,k) at origin + (i,j,k) * spacing)."""
    st = gemmi.Structure()
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    for i, (el, xyz) in enumerate(zip(elements, np.asarray(coords, np.float64) - origin)):
        res = gemmi.Residue()
        res.name = "UNK"
        res.seqid = gemmi.SeqId(i + 1, " ")
        atom = gemmi.Atom()
        atom.name = str(el)
        atom.element = gemmi.Element(str(el))
        atom.pos = gemmi.Position(*map(float, xyz))
        atom.b_iso = float(np.broadcast_to(b_iso, (len(elements),))[i])
        atom.occ = float(occupancies[i])
        res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    dc = gemmi.DensityCalculatorX() if kind == "xray" else gemmi.DensityCalculatorE()
    dc.blur = blur
    dc.grid.set_unit_cell(gemmi.UnitCell(*(np.array(shape) * spacing).tolist(), 90, 90, 90))
    dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    dc.grid.set_size(*shape)
    dc.put_model_density_on_grid(st[0])
    return np.array(dc.grid, copy=True)


def corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# ------------------------------------------------------------------------------------------------------------------
# the kernel: physics
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["xray", "em"])
def test_kernel_equals_gemmi_density_calculator_on_generated_atoms(kind):
    """Closed-form Gaussian atoms (IT92 X-ray / ITC 4.3.2.2 electron factors, B + blur) agree with gemmi's
    DensityCalculatorX/E on the same grid: CC >= 0.99 and per-voxel error below 1 % of the peak."""
    elements, coords = chain_atoms(40, seed=1, elements=("C", "N", "O", "S", "FE", "C", "P", "ZN"))
    d, b_iso, spacing = 2.0, 20.0, 0.5
    origin, shape = box(coords, spacing, padding=8.0)  # padding > cutoff radius: gemmi's periodic images stay out
    blur = resolution_blur(d)
    ours = np.asarray(DensityKernel(elements, shape, origin, spacing, b_iso + blur, kind=kind)(coords, [1.0]))
    ref = gemmi_density(elements, coords, b_iso, np.ones(len(elements)), origin, shape, spacing, blur, kind)
    assert corr(ours, ref) >= 0.99
    assert np.max(np.abs(ours - ref)) < 0.01 * ref.max()


def test_kernel_equals_gemmi_on_awa_peptide_with_its_b_factors():
    """A real peptide (AWA, per-atom B and occupancy) on a 0.4 A grid: our map correlates >= 0.99 with gemmi's."""
    if not AWA.exists():
        pytest.skip(f"reference data not found: {AWA} (the shared data folder is not part of a fresh clone)")
    st = gemmi.read_structure(str(AWA))
    atoms = [a for r in st[0][0] for a in r]
    elements = np.array([a.element.name for a in atoms])
    coords = np.array([a.pos.tolist() for a in atoms], dtype=np.float32)
    b_iso = np.array([a.b_iso for a in atoms])
    occ = np.array([a.occ for a in atoms], dtype=np.float32)
    spacing, blur = 0.4, resolution_blur(1.5)
    origin, shape = box(coords, spacing, padding=7.0)
    ours = np.asarray(DensityKernel(elements, shape, origin, spacing, b_iso + blur)(coords[None], occ[None]))
    ref = gemmi_density(elements, coords, b_iso, occ, origin, shape, spacing, blur)
    assert corr(ours, ref) >= 0.99


@pytest.mark.parametrize("element", ["H", "C", "O", "S", "FE", "SE"])
def test_integral_of_one_atom_is_its_electron_count(element):
    """X-ray: the density of one atom integrates to f(0) = sum a_i + c = Z electrons (IT92); the default cutoff
    (1e-3 of the peak) keeps >= 99 % of them, a tight cutoff (1e-7) >= 99.9 %."""
    a, _ = form_factor_coefficients(element, "xray")
    z = gemmi.Element(element).atomic_number
    assert abs(a.sum() - z) < 0.02 * z  # IT92 coefficients sum to Z
    coords = np.array([[0.13, -0.07, 0.21]], np.float32)
    spacing = 0.3
    origin, shape = box(coords, spacing, padding=7.0)
    for cutoff, keep in ((1e-3, 0.99), (1e-7, 0.999)):
        kernel = DensityKernel([element], shape, origin, spacing, 20.0, cutoff=cutoff)
        total = float(np.asarray(kernel(coords, [1.0]), np.float64).sum()) * spacing**3
        assert keep * a.sum() <= total <= 1.001 * a.sum()


def test_voxel_values_follow_the_closed_form_radial_density():
    """Inside the cutoff radius every voxel holds rho(r) = sum_i a_i (4 pi/(b_i+B))^1.5 exp(-4 pi^2 r^2/(b_i+B))
    (the separable row evaluation is exact), and the weight scales it linearly."""
    coords = np.array([[1.23, -0.41, 0.37]], np.float32)
    spacing = 0.45
    origin, shape = box(coords, spacing, padding=5.0)
    kernel = DensityKernel(["O"], shape, origin, spacing, 30.0)
    grid = np.asarray(kernel(coords, [0.7]))
    axes = [origin[i] + spacing * np.arange(shape[i]) for i in range(3)]
    pos = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    r = np.linalg.norm(pos - coords[0], axis=-1)
    inside = r < kernel.radius
    assert np.all(grid[inside] > 0)  # every voxel within the cutoff radius is covered by the atom's window
    written = grid != 0  # the window (a cylinder around the cutoff sphere) holds the exact closed form too
    expected = 0.7 * atom_density(r[written], "O", 30.0)
    np.testing.assert_allclose(grid[written], expected, rtol=2e-4, atol=1e-6 * expected.max())
    assert np.all(grid[r > np.sqrt(2) * (kernel.radius + 2 * spacing)] == 0)  # nothing beyond the window


def test_gradient_matches_finite_differences():
    """d/dx and d/dw of a smooth functional of the map (custom VJP: gather + analytic derivative of the Gaussians)
    agree with central finite differences (float32; atoms kept away from voxel-rounding boundaries)."""
    rng = np.random.default_rng(3)
    spacing = 0.5
    elements = np.array(["C", "N", "O", "S", "C", "O"])
    voxels = rng.integers(12, 20, size=(len(elements), 3))
    coords = (voxels + rng.uniform(-0.3, 0.3, size=voxels.shape)) * spacing  # origin 0
    origin, shape = np.zeros(3), (32, 32, 32)
    kernel = DensityKernel(elements, shape, origin, spacing, 25.0)
    target = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    weights = jnp.asarray(rng.uniform(0.5, 1.5, len(elements)).astype(np.float32))

    def loss(x, w):
        return jnp.sum(kernel(x[None], w[None]) * target)

    x0 = jnp.asarray(coords, jnp.float32)
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x0, weights)
    f = jax.jit(loss)
    eps = 2e-3
    fd_x = np.zeros(coords.shape)
    for i in range(len(elements)):
        for k in range(3):
            dx = jnp.zeros_like(x0).at[i, k].set(eps)
            fd_x[i, k] = (float(f(x0 + dx, weights)) - float(f(x0 - dx, weights))) / (2 * eps)
    np.testing.assert_allclose(np.asarray(gx), fd_x, atol=3e-2 * np.abs(fd_x).max())
    # the functional is linear in the weights: d/dw_i = L(w = e_i)
    fd_w = [float(f(x0, jnp.eye(len(elements))[i])) for i in range(len(elements))]
    np.testing.assert_allclose(np.asarray(gw), fd_w, rtol=1e-4, atol=1e-4 * np.abs(fd_w).max())


def test_ensemble_density_is_the_weighted_sum_of_member_densities():
    """Densities, not members, are averaged: rho([x1, x2], [w1, w2]) = w1 rho(x1) + w2 rho(x2)."""
    elements, x1 = chain_atoms(25, seed=4)
    x2 = x1 + np.random.default_rng(5).normal(0, 0.8, x1.shape).astype(np.float32)
    origin, shape = box(np.concatenate([x1, x2]), 0.5, 5.0)
    kernel = jax.jit(DensityKernel(elements, shape, origin, 0.5, 36.0))
    both = np.asarray(kernel(np.stack([x1, x2]), jnp.array([0.3, 0.7])))
    separate = 0.3 * np.asarray(kernel(x1[None], jnp.ones(1))) + 0.7 * np.asarray(kernel(x2[None], jnp.ones(1)))
    np.testing.assert_allclose(both, separate, atol=1e-5 * both.max())


def test_atoms_outside_the_box_only_add_their_tails():
    """An atom beyond the box edge contributes exactly its (truncated) tail: no wrap-around, no clipping to the edge."""
    coords = np.array([[-1.2, 3.0, 3.0]], np.float32)  # 1.2 A left of the box
    spacing = 0.5
    origin, shape = np.zeros(3), (14, 14, 14)
    kernel = DensityKernel(["C"], shape, origin, spacing, 36.0)
    grid = np.asarray(kernel(coords, [1.0]))
    axes = [spacing * np.arange(n) for n in shape]
    r = np.linalg.norm(np.stack(np.meshgrid(*axes, indexing="ij"), -1) - coords[0], axis=-1)
    inside = r < kernel.radius
    np.testing.assert_allclose(grid[inside], atom_density(r[inside], "C", 36.0), rtol=2e-4, atol=1e-7)
    far = np.asarray(kernel(np.array([[1e4, -1e4, 50.0]], np.float32), [1.0]))
    assert np.all(far == 0)


# ------------------------------------------------------------------------------------------------------------------
# the observable
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peptide():
    elements, coords = chain_atoms(30, seed=7)
    atoms = atom_info(elements, coords)
    density_map = synthetic_map(atoms, coords[None], [1.0], resolution=2.0, b_factor=20.0)
    return atoms, coords, density_map


def test_true_model_has_rscc_near_one_and_a_displaced_model_less(peptide):
    """Against its own synthetic map the true model has RSCC > 0.99, the maximum log-likelihood (0); a model shifted
    by 1 A scores lower on both."""
    atoms, coords, density_map = peptide
    obs = DensityObservable(atoms, map=density_map, resolution=2.0, b_factor=20.0)
    w = jnp.ones(1)
    true = obs.report(jnp.asarray(coords[None]), w)
    moved = obs.report(jnp.asarray(coords[None] + np.float32([1.0, 0.0, 0.0])), w)
    assert true["rscc"] > 0.99 and true["cc_box"] > 0.99
    assert abs(true["scale"] - 1.0) < 1e-2 and abs(true["offset"]) < 1e-3
    assert moved["rscc"] < true["rscc"] - 0.05
    assert moved["log_likelihood"] < true["log_likelihood"]
    assert abs(true["log_likelihood"]) < 1e-2 * abs(moved["log_likelihood"])


def test_log_likelihood_ignores_the_maps_absolute_scale_and_offset(peptide):
    """The closed-form scale/offset fit makes logL and RSCC invariant to rho_obs -> 7 rho_obs + 3."""
    atoms, coords, density_map = peptide
    noisy = synthetic_map(atoms, coords[None], [1.0], noise_snr=3.0, seed=11)
    scaled = DensityMap(values=7.0 * noisy.values + 3.0, origin=noisy.origin, spacing=noisy.spacing,
                        resolution=noisy.resolution)
    x = jnp.asarray(coords[None] + np.random.default_rng(2).normal(0, 0.4, coords.shape).astype(np.float32))
    a = DensityObservable(atoms, map=noisy)
    b = DensityObservable(atoms, map=scaled)
    ra, rb = a.report(x, jnp.ones(1)), b.report(x, jnp.ones(1))
    assert ra["log_likelihood"] == pytest.approx(rb["log_likelihood"], rel=1e-4)
    assert ra["rscc"] == pytest.approx(rb["rscc"], abs=1e-5)
    assert rb["scale"] == pytest.approx(7.0 * ra["scale"], rel=1e-4)
    ga = np.asarray(jax.grad(a.log_likelihood)(x, jnp.ones(1)))
    gb = np.asarray(jax.grad(b.log_likelihood)(x, jnp.ones(1)))
    np.testing.assert_allclose(ga, gb, rtol=1e-3, atol=1e-3 * np.abs(ga).max())


def test_log_likelihood_is_finite_for_a_model_without_density_in_the_mask(peptide):
    """Degenerate case: a model far from the map (zero density in the mask) gives a finite logL and gradient."""
    atoms, coords, density_map = peptide
    obs = DensityObservable(atoms, map=density_map)
    far = jnp.asarray(coords[None] + 500.0)
    value, grad = jax.value_and_grad(obs.log_likelihood)(far, jnp.ones(1))
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    assert float(value) == pytest.approx(-obs.n_independent / (2 * obs.sigma**2), rel=1e-5)


def test_vmap_over_particles_equals_a_loop(peptide):
    """Guidance evaluates FK particles with jax.vmap(log_likelihood, in_axes=(0, None)): same values and gradients
    as one call per particle."""
    atoms, coords, density_map = peptide
    obs = DensityObservable(atoms, map=density_map)
    rng = np.random.default_rng(8)
    particles = jnp.asarray(coords[None, None] + rng.normal(0, 0.5, (3, 2) + coords.shape).astype(np.float32))
    w = jnp.array([0.25, 0.75])
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(obs.log_likelihood), in_axes=(0, None)))(particles, w)
    for p in range(3):
        v, g = jax.value_and_grad(obs.log_likelihood)(particles[p], w)
        assert float(values[p]) == pytest.approx(float(v), rel=1e-5)
        scale = float(jnp.abs(g).max())
        np.testing.assert_allclose(np.asarray(grads[p]), np.asarray(g), rtol=1e-4, atol=1e-4 * scale)


def test_gradient_of_log_likelihood_matches_finite_differences(peptide):
    """The likelihood's coordinate gradient (through the mask gather, CC fit and kernel VJP) matches finite
    differences along a random direction."""
    atoms, coords, density_map = peptide
    obs = DensityObservable(atoms, map=density_map, sigma=1.0)
    rng = np.random.default_rng(9)
    x = jnp.asarray(coords[None] + rng.normal(0, 0.3, coords.shape).astype(np.float32))
    direction = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    direction = direction / jnp.linalg.norm(direction)
    g = jax.grad(obs.log_likelihood)(x, jnp.ones(1))
    eps = 1e-3
    f = jax.jit(obs.log_likelihood)
    fd = (float(f(x + eps * direction, jnp.ones(1))) - float(f(x - eps * direction, jnp.ones(1)))) / (2 * eps)
    assert float(jnp.vdot(g, direction)) == pytest.approx(fd, rel=0.05, abs=1e-3 * float(jnp.linalg.norm(g)))


def test_altloc_map_prefers_the_right_occupancies():
    """A map made of two conformers at 0.7/0.3 is fitted better by that ensemble than by 0.3/0.7 or by one member."""
    elements, x1 = chain_atoms(20, seed=12)
    x2 = x1.copy()
    x2[8:14] += np.float32([2.0, -1.5, 1.0])
    atoms = atom_info(elements, np.stack([x1, x2]))
    density_map = synthetic_map(atoms, np.stack([x1, x2]), [0.7, 0.3])
    obs = DensityObservable(atoms, map=density_map)
    ens = jnp.asarray(np.stack([x1, x2]))
    right = float(obs.log_likelihood(ens, jnp.array([0.7, 0.3])))
    assert right > float(obs.log_likelihood(ens, jnp.array([0.3, 0.7])))
    assert right > float(obs.log_likelihood(ens, jnp.array([1.0, 0.0])))


def test_registry_builds_the_density_observable(peptide):
    atoms, coords, density_map = peptide
    obs = build("density", atoms, map=density_map)
    assert isinstance(obs, Observable) and obs.name == "density"
    assert obs.predict(jnp.asarray(coords[None]), jnp.ones(1)).shape == obs.grid.shape == obs.mask.shape


def test_observable_errors_are_clear(peptide):
    atoms, coords, density_map = peptide
    with pytest.raises(MapError, match="needs a map"):
        DensityObservable(atoms)
    with pytest.raises(ValueError, match="reference coordinates"):
        DensityObservable(atom_info(atoms.element, None), map=density_map)
    far_atoms = atom_info(atoms.element, coords + 100.0)
    with pytest.raises(MapError, match="does not cover"):
        DensityObservable(far_atoms, map=density_map)
    with pytest.raises(ValueError, match="unknown element 'Xx'"):
        DensityKernel(["C", "Xx"], (4, 4, 4), np.zeros(3), 0.5, 20.0)
    odd = atom_info(np.where(np.arange(len(atoms)) == 3, "Qq", atoms.element), coords)
    with pytest.raises(ValueError, match="UNK A4: unknown element 'Qq'"):  # names the residue
        DensityObservable(odd, map=density_map)


# ------------------------------------------------------------------------------------------------------------------
# maps: files
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 0.2])
def test_ccp4_round_trip_keeps_values_at_their_positions(tmp_path, peptide, shift):
    """write_ccp4 -> read_map gives back the same values at the same absolute positions (origin on the grid
    lattice: start indices; off the lattice: MRC ORIGIN words), and boxes cut from the file match the source."""
    _, coords, density_map = peptide
    m = DensityMap(values=density_map.values, origin=density_map.origin + shift, spacing=density_map.spacing)
    path = write_ccp4(tmp_path / "model.ccp4", m)
    assert not [p for p in tmp_path.iterdir() if p.name != "model.ccp4"]  # no temp file left behind
    back = read_map(path)
    np.testing.assert_allclose(back.origin, m.origin, atol=1e-4)
    np.testing.assert_allclose(back.spacing, m.spacing, atol=1e-6)
    np.testing.assert_array_equal(back.values, m.values)
    sub = read_map(path, box_around=coords[5:15] + shift, padding=2.0)
    i0 = np.round((sub.origin - m.origin) / m.spacing).astype(int)
    n = sub.shape
    expected = m.values[i0[0] : i0[0] + n[0], i0[1] : i0[1] + n[1], i0[2] : i0[2] + n[2]]
    np.testing.assert_array_equal(sub.values, expected)


def write_map_coefficients(path: Path, density_map: DensityMap, labels=("FWT", "PHWT")) -> None:
    """Fourier transform a box map (taken as a P1 cell, origin at the box origin) into an MTZ with F/PHI columns."""
    cell = gemmi.UnitCell(*(np.array(density_map.shape) * density_map.spacing).tolist(), 90, 90, 90)
    grid = gemmi.FloatGrid(density_map.values, cell, gemmi.SpaceGroup("P 1"))
    d_min = 2.0 * density_map.spacing.max()  # Nyquist: keep every coefficient of the grid
    coefficients = gemmi.transform_map_to_f_phi(grid, half_l=True).prepare_asu_data(dmin=d_min)
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup("P 1")
    mtz.set_cell_for_all(cell)
    mtz.add_dataset("synthetic")
    mtz.add_column(labels[0], "F")
    mtz.add_column(labels[1], "P")
    values = coefficients.value_array
    data = np.column_stack([coefficients.miller_array, np.abs(values), np.angle(values, deg=True)])
    mtz.set_data(data.astype(np.float32))
    mtz.write_to_file(str(path))


@pytest.mark.parametrize("labels", [("FWT", "PHWT"), ("2FOFCWT", "PH2FOFCWT")])
def test_mtz_map_coefficients_give_back_the_map(tmp_path, peptide, labels):
    """An MTZ with map coefficients (FWT/PHWT or 2FOFCWT/PH2FOFCWT, found by 'auto') Fourier transforms back to the
    original map (CC > 0.99 on the same positions)."""
    _, coords, density_map = peptide
    path = tmp_path / "coefficients.mtz"
    write_map_coefficients(path, density_map, labels)
    # the MTZ cell frame has the box origin at 0
    back = read_map(path, spacing=float(density_map.spacing[0]), box_around=coords - density_map.origin, padding=3.0)
    i0 = np.round(back.origin / density_map.spacing).astype(int)
    n = back.shape
    original = density_map.values[i0[0] : i0[0] + n[0], i0[1] : i0[1] + n[1], i0[2] : i0[2] + n[2]]
    assert corr(back.values, original) > 0.99
    explicit = read_map(path, mtz_columns=",".join(labels), box_around=coords - density_map.origin, padding=3.0)
    assert explicit.values.std() > 0


def test_map_errors_name_the_problem(tmp_path, peptide):
    _, coords, density_map = peptide
    missing = tmp_path / "absent.ccp4"
    with pytest.raises(MapError, match="absent.ccp4"):
        read_map(missing)
    garbage = tmp_path / "garbage.mrc"
    garbage.write_bytes(b"not a map" * 10)
    with pytest.raises(MapError, match="garbage.mrc"):
        read_map(garbage)
    bad_mtz = tmp_path / "broken.mtz"
    bad_mtz.write_bytes(b"MTZ " + b"\0" * 100)
    with pytest.raises(MapError, match="broken.mtz"):
        read_map(bad_mtz)
    text = tmp_path / "map.txt"
    text.write_text("1 2 3\n")
    with pytest.raises(MapError, match="unknown map format"):
        read_map(text)
    mtz_path = tmp_path / "other.mtz"
    write_map_coefficients(mtz_path, density_map, ("FP", "PHIB"))
    with pytest.raises(MapError, match="FP, PHIB"):  # 'auto' finds no pair and lists the columns
        read_map(mtz_path)
    with pytest.raises(MapError, match="DELFWT"):
        read_map(mtz_path, mtz_columns="DELFWT,PHDELWT")


def test_partial_ccp4_map_must_cover_the_model(tmp_path):
    """A CCP4 map holding only part of its cell is usable for a model inside its data block; a model outside it is
    refused with MapError."""
    elements, coords = chain_atoms(12, seed=13)
    coords = coords - coords.min(0) + 12.0  # inside the data block [10, 30) A of a 60 A cell
    spacing, start, n = 0.5, 20, 40
    values = np.random.default_rng(0).normal(size=(n, n, n)).astype(np.float32)
    ccp4 = gemmi.Ccp4Map()
    ccp4.grid = gemmi.FloatGrid(values, gemmi.UnitCell(60, 60, 60, 90, 90, 90), gemmi.SpaceGroup("P 1"))
    ccp4.update_ccp4_header(2, True)
    for word in (5, 6, 7):
        ccp4.set_header_i32(word, start)
    for word in (8, 9, 10):
        ccp4.set_header_i32(word, 120)
    path = tmp_path / "partial.map"
    ccp4.write_ccp4_map(str(path))
    inside = read_map(path, box_around=coords, padding=1.0)
    i0 = np.round(inside.origin / spacing).astype(int) - start
    k = inside.shape
    expected = values[i0[0] : i0[0] + k[0], i0[1] : i0[1] + k[1], i0[2] : i0[2] + k[2]]
    np.testing.assert_array_equal(inside.values, expected)
    with pytest.raises(MapError, match="does not cover the model"):
        read_map(path, box_around=coords + 25.0)
    atoms = atom_info(elements, coords)
    with pytest.raises(MapError, match="does not say its resolution"):  # a CCP4 map without a resolution label
        DensityObservable(atoms, map=path, padding=1.0)
    obs = DensityObservable(atoms, map=path, padding=1.0, resolution=2.0)
    assert obs.grid.shape == inside.shape


def test_non_orthogonal_cell_is_interpolated_onto_an_orthogonal_box(tmp_path):
    """A periodic map on a monoclinic cell is resampled (tricubic, periodic) onto the orthogonal box: values match the
    analytic function at the box positions, including points in neighbouring cells."""
    cell = gemmi.UnitCell(15.0, 10.0, 20.0, 90.0, 105.0, 90.0)
    n = (60, 40, 80)
    frac = np.stack(np.meshgrid(*[np.arange(k) / k for k in n], indexing="ij"), axis=-1)

    def smooth(f):  # periodic in the cell, a few Fourier terms
        u, v, w = f[..., 0], f[..., 1], f[..., 2]
        return np.cos(2 * np.pi * u) + 0.5 * np.sin(2 * np.pi * (v + w)) + 0.3 * np.cos(4 * np.pi * w)

    ccp4 = gemmi.Ccp4Map()
    # a crystallographic space group (ISPG > 1): the full cell is periodic (a P1 full cell would be read as a box)
    ccp4.grid = gemmi.FloatGrid(smooth(frac).astype(np.float32), cell, gemmi.SpaceGroup("P 1 2 1"))
    ccp4.update_ccp4_header(2, True)
    path = tmp_path / "monoclinic.ccp4"
    ccp4.write_ccp4_map(str(path))
    points = np.array([[2.0, 3.0, 4.0], [18.0, 12.0, 25.0]])  # spans more than one cell
    m = read_map(path, box_around=points, spacing=0.6, padding=1.0)
    pos = np.stack(np.meshgrid(*m.axis_positions(), indexing="ij"), axis=-1)
    expected = smooth(pos @ np.array(cell.frac.mat.tolist()).T)
    assert np.max(np.abs(m.values - expected)) < 0.02
    with pytest.raises(MapError, match="orthogonal"):
        read_map(path)


def test_member_predictions_give_the_same_likelihood_as_the_coordinates():
    """The map is linear in the member weights: the log-likelihood from precomputed member densities equals the
    direct one for any weights."""
    rng = np.random.default_rng(3)
    n = 40
    elements = np.array(["C", "N", "O", "S"])[rng.integers(0, 4, n)]
    atoms = AtomInfo(element=elements, atom_name=np.array(["X"] * n), res_name=np.array(["UNK"] * n),
                     res_seq=np.arange(n), chain_id=np.array(["A"] * n))
    conf = rng.uniform(0, 12, size=(2, n, 3)).astype(np.float32)
    atoms_ref = AtomInfo(atoms.element, atoms.atom_name, atoms.res_name, atoms.res_seq, atoms.chain_id, coords=conf)
    obs = DensityObservable(atoms_ref, map=synthetic_map(atoms, conf, [0.7, 0.3], resolution=2.0), resolution=2.0)
    members = (conf + rng.normal(scale=0.3, size=conf.shape)).astype(np.float32)
    preds = obs.member_predictions(jnp.asarray(members))
    for w in ([0.5, 0.5], [0.9, 0.1], [0.2, 0.8]):
        w = jnp.asarray(w, dtype=jnp.float32)
        direct = float(obs.log_likelihood(jnp.asarray(members), w))
        fast = float(obs.log_likelihood_from_predictions(preds, w))
        assert fast == pytest.approx(direct, rel=1e-4, abs=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# real maps scored with the data's own resolution and the structure's B-factors


def _score(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "guidance.app", "mode=score", *args], capture_output=True, text=True,
                          timeout=600)


def test_score_mode_rscc_on_a_real_map_equals_gemmi_with_the_datas_resolution(shared_data, tmp_path):
    """Score mode with default settings on 1dur's 2mFo-DFc coefficients (FWT/PHWT) uses the MTZ's d_min and the
    model's own per-atom B (waters included as fixed atoms), and its RSCC equals an independent gemmi computation
    within 0.01: DensityCalculatorX with every atom's B, blurred by this project's resolution convention (4 d^2,
    observables.density.resolution_blur) at the data's d_min, correlated with the same map in the same mask."""
    import json

    from observables.density import _sphere_mask

    pdb, mtz = shared_data("xray/1dur/1dur.pdb"), shared_data("xray/1dur/1dur.mtz")
    proc = _score(f"structure={pdb}", f"observables.density.map={mtz}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "metrics.json").read_text())["observables"]["density"]
    d_min = gemmi.read_mtz_file(str(mtz)).resolution_high()
    assert rep["resolution"] == pytest.approx(d_min) and "MTZ" in rep["resolution_source"]
    assert rep["b_factors"] == "the structure's per-atom B" and rep["environment_atoms"] == 93

    st = gemmi.read_structure(str(pdb))
    st.setup_entities()
    st.remove_hydrogens()
    protein = np.array([a.pos.tolist() for ch in st[0] for r in ch if not r.is_water() for a in r])
    dmap = read_map(mtz, box_around=protein, padding=5.0)
    mask = _sphere_mask(dmap, protein, 2.0)
    points = np.stack(np.meshgrid(*dmap.axis_positions(), indexing="ij"), -1)[mask]
    dc = gemmi.DensityCalculatorX()
    dc.d_min = d_min
    dc.rate = 2.0
    dc.blur = resolution_blur(d_min)
    dc.set_grid_cell_and_spacegroup(st)
    dc.put_model_density_on_grid(st[0])
    model = np.array([dc.grid.interpolate_value(gemmi.Position(*p)) for p in points])
    gemmi_rscc = float(np.corrcoef(dmap.values[mask], model)[0, 1])
    print(f"RSCC: ensemble-guide {rep['rscc']:.4f}, gemmi {gemmi_rscc:.4f}")
    assert abs(rep["rscc"] - gemmi_rscc) < 0.01


def test_map_from_another_crystal_is_refused_and_a_misplaced_model_warns(shared_data, tmp_path):
    """An MTZ whose cell and space group differ from the structure's is refused in one line naming both; a model in
    the right crystal but not where the map is gets RSCC near zero and a warning in metrics.json."""
    import json

    pdb, mtz = shared_data("xray/5e5z/5e5z.pdb"), shared_data("xray/1dur/1dur.mtz")
    proc = _score(f"structure={pdb}", f"observables.density.map={mtz}", f"hydra.run.dir={tmp_path / 'other'}")
    assert proc.returncode == 1
    line = [ln for ln in proc.stderr.splitlines() if "another crystal" in ln]
    assert line and "P 21 21 21" in line[0] and "P 1 21 1" in line[0] and "allow_other_crystal" in line[0]

    st = gemmi.read_structure(str(shared_data("xray/1dur/1dur.pdb")))
    for ch in st[0]:
        for r in ch:
            for a in r:
                a.pos = gemmi.Position(a.pos.x + 7.0, a.pos.y - 9.0, a.pos.z + 5.0)
    moved = tmp_path / "moved.pdb"
    st.write_pdb(str(moved))
    proc = _score(f"structure={moved}", f"observables.density.map={shared_data('xray/1dur/1dur.mtz')}",
                  f"hydra.run.dir={tmp_path / 'moved'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "moved" / "metrics.json").read_text())["observables"]["density"]
    assert rep["rscc"] < 0.2 and "near zero" in rep["warning"]
    assert "near zero" in (tmp_path / "moved" / "run.log").read_text()


def test_a_maps_resolution_is_read_back_from_its_header(tmp_path):
    """A map written with its resolution keeps it in a CCP4 header label that map_info reads back; a map without one
    needs the resolution given (one-line MapError)."""
    from observables.density import map_info

    m = DensityMap(np.random.default_rng(0).random((10, 12, 14), dtype=np.float32), np.zeros(3), 0.5, resolution=1.7)
    info = map_info(write_ccp4(tmp_path / "with.ccp4", m))
    assert info.resolution == pytest.approx(1.7) and "label" in info.resolution_source
    bare = write_ccp4(tmp_path / "bare.ccp4", DensityMap(m.values, m.origin, m.spacing))
    assert map_info(bare).resolution is None

"""Reading and writing structures: altlocs become conformers, ensembles survive a round trip through mmCIF."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import gemmi
import numpy as np
import pytest

from guidance.structures.io import (
    Conformers,
    StructureError,
    altloc_regions,
    match_layouts,
    read_structure,
    select_atoms,
    write_altloc_structure,
    write_ensemble_cif,
)
from predictors.base import AtomLayout

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PEPTIDES = DATA / "structures" / "multiconf-peptides"
ALTLOC = DATA / "structures" / "altloc"

needs_peptides = pytest.mark.skipif(not PEPTIDES.is_dir(), reason=f"shared test data not found at {PEPTIDES}")
needs_altloc = pytest.mark.skipif(not ALTLOC.is_dir(), reason=f"shared test data not found at {ALTLOC}")


# ----------------------------------------------------------------------------------------------------------------
# tiny structures built in code


def _pdb_text(models: list[list[tuple]]) -> str:
    """PDB text (written by gemmi) for models given as lists of
    (chain, res_seq, res_name, atom_name, element, altloc, occ, (x, y, z)[, b])."""
    st = gemmi.Structure()
    for m, atoms in enumerate(models, start=1):
        model = gemmi.Model(str(m))
        chains: dict[str, gemmi.Chain] = {}
        for chain_id, seq, rname, aname, el, alt, occ, xyz, *b in atoms:
            chain = chains.setdefault(chain_id, gemmi.Chain(chain_id))
            if len(chain) == 0 or chain[len(chain) - 1].seqid.num != seq or chain[len(chain) - 1].name != rname:
                res = gemmi.Residue()
                res.name, res.seqid = rname, gemmi.SeqId(seq, " ")
                res.het_flag = "H" if rname in ("HOH", "GOL") else "A"
                chain.add_residue(res)
            atom = gemmi.Atom()
            atom.name, atom.element, atom.altloc = aname, gemmi.Element(el), alt or "\0"
            atom.pos, atom.occ, atom.b_iso = gemmi.Position(*xyz), occ, (b[0] if b else 15.0)
            chain[len(chain) - 1].add_atom(atom)
        for chain in chains.values():
            model.add_chain(chain)
        st.add_model(model)
    st.setup_entities()
    return st.make_pdb_string()


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _tripeptide_layout() -> tuple[AtomLayout, np.ndarray]:
    names = ["N", "CA", "C", "O", "CB"]
    layout = AtomLayout(
        chain_id=["A"] * 15,
        res_seq=[1] * 5 + [2] * 5 + [3] * 5,
        res_name=["ALA"] * 5 + ["SER"] * 5 + ["ALA"] * 5,
        atom_name=names * 3,
        element=["N", "C", "C", "O", "C"] * 3,
    )
    xyz = np.arange(45, dtype=np.float64).reshape(15, 3) * 0.7 + np.sin(np.arange(45)).reshape(15, 3)
    return layout, xyz


# ----------------------------------------------------------------------------------------------------------------
# the shared multiconformer peptides


def _file_altlocs(path: Path) -> dict[str, list[float]]:
    """Occupancies per altloc id as gemmi sees them (non-hydrogen, non-water atoms)."""
    occ: dict[str, list[float]] = defaultdict(list)
    st = gemmi.read_structure(str(path))
    for chain in st[0]:
        for res in chain:
            if res.is_water():
                continue
            for atom in res:
                if atom.has_altloc() and not atom.is_hydrogen():
                    occ[atom.altloc].append(atom.occ)
    return occ


# one placeholder when the data are absent, so the test shows up as skipped with needs_peptides' reason
MULTICONF = (
    sorted(p.name for p in PEPTIDES.glob("*_multiconf.pdb")) + ["AWA_2conf.pdb", "AWA_3conf.pdb"]
    if PEPTIDES.is_dir() else ["no-shared-data"]
)


@needs_peptides
@pytest.mark.parametrize("name", MULTICONF)
def test_each_altloc_of_a_multiconformer_peptide_is_one_conformer_weighted_by_its_occupancy(name):
    path = PEPTIDES / name
    conf = read_structure(path)
    occ = _file_altlocs(path)
    assert conf.kind == "altloc"
    assert conf.ids == sorted(occ)
    assert conf.coords.shape == (len(occ), len(conf.layout), 3)
    expected = np.array([np.mean(occ[a]) for a in conf.ids])
    np.testing.assert_allclose(conf.weights, expected / expected.sum(), atol=1e-6)
    assert conf.weights.sum() == pytest.approx(1.0)
    # atoms without altlocs are one physical atom: identical in every conformer
    shared = ~conf.varying
    for k in range(len(conf.ids)):
        np.testing.assert_array_equal(conf.coords[k, shared], conf.coords[0, shared])
    # every atom key appears exactly once
    assert len(conf.layout.index()) == len(conf.layout)


@needs_peptides
def test_awa_3conf_has_three_tryptophan_conformers_with_occupancies_04_03_03():
    conf = read_structure(PEPTIDES / "AWA_3conf.pdb")
    assert conf.ids == ["A", "B", "C"]
    np.testing.assert_allclose(conf.weights, [0.4, 0.3, 0.3], atol=1e-6)
    assert set(conf.layout.res_seq[conf.varying].tolist()) == {2}
    single = read_structure(PEPTIDES / "AWA_single.pdb")
    assert single.kind == "single" and single.coords.shape[0] == 1
    assert set(single.layout.keys()) == set(conf.layout.keys())


@needs_altloc
def test_6b8x_altloc_region_spans_the_180s_loop():
    conf = read_structure(ALTLOC / "6b8x_final.pdb")
    assert conf.ids == ["A", "B", "C"]
    assert not np.isin(conf.layout.res_name, ["HOH"]).any()
    regions = altloc_regions(conf, min_span=3)
    assert any(c == "A" and lo <= 180 and hi >= 184 for c, lo, hi in regions), regions
    assert all(hi - lo + 1 >= 3 for _, lo, hi in regions)
    # residues 281-298 carry only altloc A: every conformer uses A there
    tail = select_atoms(conf.layout, chain="A", residues=(281, 298))
    for k in range(3):
        np.testing.assert_array_equal(conf.coords[k, tail], conf.coords[0, tail])


@needs_altloc
def test_1vme_mmcif_reads_two_half_occupied_conformers():
    conf = read_structure(ALTLOC / "1vme_final_carved_edited_0.5occA_0.5occB.cif")
    assert conf.kind == "altloc" and conf.ids == ["A", "B"]
    np.testing.assert_allclose(conf.weights, [0.5, 0.5])
    assert conf.varying.sum() == 127
    moved = np.linalg.norm(conf.coords[0] - conf.coords[1], axis=-1)
    assert moved[~conf.varying].max() == 0.0
    assert moved[conf.varying].max() > 0.5


# ----------------------------------------------------------------------------------------------------------------
# round trips


def test_ensemble_written_as_multimodel_mmcif_reads_back_with_coordinates_and_weights(tmp_path):
    layout, xyz = _tripeptide_layout()
    rng = np.random.default_rng(0)
    coords = xyz[None] + rng.normal(scale=1.5, size=(4, len(layout), 3))
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    path = write_ensemble_cif(tmp_path / "out" / "ensemble.cif", layout, coords, weights,
                              metadata={"seed": 7, "predictor": "reference"})
    conf = read_structure(path)
    assert conf.kind == "models" and conf.ids == ["1", "2", "3", "4"]
    np.testing.assert_allclose(conf.coords, coords, atol=1e-3)
    np.testing.assert_allclose(conf.weights, weights, atol=1e-7)
    assert conf.layout.keys() == layout.keys()
    assert conf.layout.res_name.tolist() == layout.res_name.tolist()
    assert conf.metadata == {"seed": 7, "predictor": "reference"}
    # gemmi sees a proper polymer entity with its sequence
    st = gemmi.read_structure(str(path))
    assert len(st) == 4
    polymer = [e for e in st.entities if e.entity_type == gemmi.EntityType.Polymer]
    assert len(polymer) == 1 and list(polymer[0].full_sequence) == ["ALA", "SER", "ALA"]
    # written atomically: nothing but the file is left in the folder
    assert [p.name for p in path.parent.iterdir()] == ["ensemble.cif"]
    # the input's crystal and per-atom B are kept when given
    b = np.linspace(8.0, 60.0, len(layout))
    kept = read_structure(write_ensemble_cif(tmp_path / "c.cif", layout, coords, weights, b_factors=b,
                                             crystal=((30.52, 37.75, 39.37, 90.0, 90.0, 90.0), "P 21 21 21")))
    assert kept.crystal[1] == "P 21 21 21" and kept.crystal[0] == pytest.approx((30.52, 37.75, 39.37, 90, 90, 90))
    np.testing.assert_allclose(kept.b_iso, np.broadcast_to(b, kept.b_iso.shape), atol=0.01)


def test_multimodel_file_without_recorded_weights_gets_uniform_weights(tmp_path):
    atoms = [("A", 1, "GLY", "CA", "C", "", 1.0, (0.0, 0.0, 0.0)), ("A", 2, "GLY", "CA", "C", "", 1.0, (3.8, 0, 0))]
    moved = [a[:7] + ((a[7][0], 1.0, 0.0),) for a in atoms]
    conf = read_structure(_write(tmp_path, "nmr.pdb", _pdb_text([atoms, moved, atoms])))
    assert conf.kind == "models" and conf.ids == ["1", "2", "3"]
    np.testing.assert_allclose(conf.weights, [1 / 3] * 3)
    assert conf.varying.all()


@pytest.mark.parametrize("suffix", [".pdb", ".cif", ".pdb.gz"])
def test_altloc_structure_round_trips_conformers_and_occupancies(tmp_path, suffix):
    layout, xyz = _tripeptide_layout()
    coords = np.stack([xyz, xyz.copy()])
    coords[1, 5:10] += np.array([0.0, 2.0, 0.0])  # residue 2 takes a second position
    coords[1, 0] += 0.004  # below tolerance: written once
    path = write_altloc_structure(tmp_path / f"two{suffix}", layout, coords, [0.7, 0.3])
    conf = read_structure(path)
    assert conf.kind == "altloc" and conf.ids == ["A", "B"]
    np.testing.assert_allclose(conf.weights, [0.7, 0.3], atol=1e-6)
    np.testing.assert_allclose(conf.coords, coords, atol=0.01)
    assert conf.varying.tolist() == [False] * 5 + [True] * 5 + [False] * 5
    assert conf.layout.keys() == layout.keys()


def test_identical_conformers_are_written_without_altlocs(tmp_path):
    layout, xyz = _tripeptide_layout()
    conf = read_structure(write_altloc_structure(tmp_path / "same.pdb", layout, np.stack([xyz, xyz]), [0.5, 0.5]))
    assert conf.kind == "single"
    np.testing.assert_allclose(conf.coords[0], xyz, atol=1e-3)


def test_altloc_conformers_read_back_from_a_written_ensemble_agree(tmp_path):
    """altlocs -> conformers -> multi-model mmCIF -> conformers keeps every coordinate."""
    layout, xyz = _tripeptide_layout()
    coords = np.stack([xyz, xyz + np.array([0, 0, 1.0]) * (np.arange(15) >= 10)[:, None]])
    conf = read_structure(write_altloc_structure(tmp_path / "a.cif", layout, coords, [0.6, 0.4]))
    back = read_structure(write_ensemble_cif(tmp_path / "e.cif", conf.layout, conf.coords, conf.weights))
    np.testing.assert_allclose(back.coords, conf.coords, atol=1e-3)
    np.testing.assert_allclose(back.weights, [0.6, 0.4], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# altloc semantics


def test_atom_without_a_given_altloc_takes_its_most_occupied_one(tmp_path):
    atoms = [
        ("A", 1, "SER", "CA", "C", "", 1.0, (0.0, 0.0, 0.0)),
        ("A", 1, "SER", "OG", "O", "A", 0.3, (1.0, 0.0, 0.0)),
        ("A", 1, "SER", "OG", "O", "B", 0.7, (0.0, 1.0, 0.0)),
        ("A", 2, "LYS", "NZ", "N", "A", 0.5, (5.0, 0.0, 0.0)),
        ("A", 2, "LYS", "NZ", "N", "B", 0.2, (6.0, 0.0, 0.0)),
        ("A", 2, "LYS", "NZ", "N", "C", 0.3, (7.0, 0.0, 0.0)),
    ]
    conf = read_structure(_write(tmp_path, "abc.pdb", _pdb_text([atoms])))
    assert conf.ids == ["A", "B", "C"]
    og = conf.layout.index()[("A", 1, "OG")]
    np.testing.assert_allclose(conf.coords[:, og], [[1, 0, 0], [0, 1, 0], [0, 1, 0]])  # C -> B (occupancy 0.7)
    # weights: mean occupancy per altloc (A 0.4, B 0.45, C 0.3), normalised
    np.testing.assert_allclose(conf.weights, np.array([0.4, 0.45, 0.3]) / 1.15, atol=1e-6)
    assert conf.varying.tolist() == [False, True, True]


def test_waters_and_hydrogens_are_dropped_and_ligands_kept(tmp_path):
    atoms = [
        ("A", 1, "GLY", "CA", "C", "", 1.0, (0.0, 0.0, 0.0)),
        ("A", 1, "GLY", "HA2", "H", "", 1.0, (0.0, 1.0, 0.0)),
        ("A", 2, "GOL", "C1", "C", "", 1.0, (4.0, 0.0, 0.0)),
        ("A", 3, "HOH", "O", "O", "", 1.0, (8.0, 0.0, 0.0)),
    ]
    path = _write(tmp_path, "mixed.pdb", _pdb_text([atoms]))
    assert read_structure(path).layout.atom_name.tolist() == ["CA", "C1"]
    assert read_structure(path, hydrogens=True).layout.atom_name.tolist() == ["CA", "HA2", "C1"]


def test_microheterogeneity_keeps_the_first_residue_name_and_warns(tmp_path):
    atoms = [
        ("A", 1, "GLY", "CA", "C", "", 1.0, (0.0, 0.0, 0.0)),
        ("A", 2, "MET", "CA", "C", "A", 0.6, (3.8, 0.0, 0.0)),
        ("A", 2, "LEU", "CA", "C", "B", 0.4, (3.8, 0.5, 0.0)),
    ]
    with pytest.warns(UserWarning, match="microheterogeneity"):
        conf = read_structure(_write(tmp_path, "micro.pdb", _pdb_text([atoms])))
    assert conf.layout.res_name.tolist() == ["GLY", "MET"]


def test_multimodel_file_with_altlocs_uses_the_first_models_altlocs_unless_a_model_is_named(tmp_path):
    m1 = [("A", 1, "SER", "OG", "O", "A", 0.5, (0.0, 0.0, 0.0)), ("A", 1, "SER", "OG", "O", "B", 0.5, (1.0, 0, 0))]
    m2 = [("A", 1, "SER", "OG", "O", "", 1.0, (5.0, 0.0, 0.0))]
    path = _write(tmp_path, "both.pdb", _pdb_text([m1, m2]))
    with pytest.warns(UserWarning, match="altlocs of model 1"):
        conf = read_structure(path)
    assert conf.kind == "altloc" and conf.ids == ["A", "B"]
    second = read_structure(path, model=2)
    assert second.kind == "single" and second.coords[0, 0].tolist() == [5.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------------------------
# errors that speak to the user


def test_missing_file_is_a_structure_error_naming_it(tmp_path):
    with pytest.raises(StructureError, match="nothere.pdb: no such file"):
        read_structure(tmp_path / "nothere.pdb")


@pytest.mark.parametrize("name, content", [
    ("garbage.cif", "this is not\n a 'cif file\n_atom_site.\n"),
    ("garbage.pdb", "hello world\nnothing structural here\n"),
    ("binary.pdb", bytes(range(256)) * 4),
])
def test_garbage_file_is_a_one_line_structure_error_naming_it(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(StructureError) as err:
        read_structure(path)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_model_missing_an_atom_is_an_error_naming_model_and_atom(tmp_path):
    full = [("A", 1, "ALA", "CA", "C", "", 1.0, (0.0, 0.0, 0.0)), ("A", 1, "ALA", "CB", "C", "", 1.0, (1.5, 0.0, 0.0))]
    with pytest.raises(StructureError, match="model 2 lacks atom CB of residue A ALA 1"):
        read_structure(_write(tmp_path, "models.pdb", _pdb_text([full, full[:1]])))


def test_unknown_model_and_insertion_codes_are_refused(tmp_path):
    atoms = [("A", 1, "ALA", "CA", "C", "", 1.0, (0.0, 0.0, 0.0))]
    path = _write(tmp_path, "one.pdb", _pdb_text([atoms]))
    with pytest.raises(StructureError, match="no model '7'"):
        read_structure(path, model="7")
    text = _pdb_text([atoms + [("A", 2, "ALA", "CA", "C", "", 1.0, (3.8, 0.0, 0.0))]])
    st = gemmi.read_pdb_string(text)
    st[0]["A"][1].seqid = gemmi.SeqId(1, "A")
    with pytest.raises(StructureError, match="insertion code"):
        read_structure(_write(tmp_path, "icode.pdb", st.make_pdb_string()))


def test_empty_selection_is_an_error():
    layout, _ = _tripeptide_layout()
    with pytest.raises(StructureError, match="selects no atoms"):
        select_atoms(layout, chain="Z")
    with pytest.raises(StructureError, match="selects no atoms"):
        select_atoms(layout, residues=(10, 20))


# ----------------------------------------------------------------------------------------------------------------
# layouts and selections


def test_select_atoms_combines_chain_residue_range_and_names():
    layout, _ = _tripeptide_layout()
    mask = select_atoms(layout, chain="A", residues=(2, 3), atom_names=["CA", "CB"])
    selected = [k for k, m in zip(layout.keys(), mask) if m]
    assert selected == [("A", 2, "CA"), ("A", 2, "CB"), ("A", 3, "CA"), ("A", 3, "CB")]
    assert select_atoms(layout, atom_names="O").sum() == 3


def test_match_layouts_copies_shared_atoms_and_reports_the_rest_both_ways():
    layout, xyz = _tripeptide_layout()
    src = layout.select(np.arange(15) != 4)  # no CB of residue 1
    dst = AtomLayout(
        chain_id=list(layout.chain_id[::-1]) + ["A"],
        res_seq=list(layout.res_seq[::-1]) + [4],
        res_name=list(layout.res_name[::-1]) + ["GLY"],
        atom_name=list(layout.atom_name[::-1]) + ["CA"],
        element=list(layout.element[::-1]) + ["C"],
    )
    m = match_layouts(src, dst)
    assert m.missing_in_dst == []
    assert m.missing_in_src == [("A", 1, "CB"), ("A", 4, "CA")]
    src_xyz = xyz[np.arange(15) != 4]
    out = np.full((len(dst), 3), np.nan)
    out[m.dst_index] = src_xyz[m.src_index]
    expected = np.vstack([xyz[::-1], np.full((1, 3), np.nan)])
    expected[10] = np.nan  # dst position of ("A", 1, "CB"), which src lacks
    np.testing.assert_array_equal(out, expected)
    back = match_layouts(dst, src)
    assert back.missing_in_dst == [("A", 1, "CB"), ("A", 4, "CA")] and back.missing_in_src == []


def test_altloc_regions_are_runs_of_consecutive_residues_with_varying_atoms():
    layout = AtomLayout(
        chain_id=["A"] * 6 + ["B"] * 2, res_seq=[1, 2, 3, 4, 6, 7, 1, 2], res_name=["GLY"] * 8,
        atom_name=["CA"] * 8, element=["C"] * 8,
    )
    varying = np.array([False, True, True, False, True, True, True, False])
    conf = Conformers(layout, np.zeros((2, 8, 3), np.float32), np.array([0.5, 0.5]), ["A", "B"],
                      np.zeros(8, np.float32), varying, None, "altloc")
    assert altloc_regions(conf) == [("A", 2, 3), ("A", 6, 7), ("B", 1, 1)]
    assert altloc_regions(conf, min_span=2) == [("A", 2, 3), ("A", 6, 7)]


def test_an_atom_written_twice_at_one_position_is_kept_once_with_a_warning(tmp_path):
    from structures import TRIPEPTIDE_P1_PDB as PEPTIDE

    lines = PEPTIDE.splitlines()
    twice = "\n".join(lines[:3] + [lines[2]] + lines[3:]) + "\n"  # residue 1 CA written again, same position
    path = tmp_path / "twice.pdb"
    path.write_text(twice)
    with pytest.warns(UserWarning, match=r"1 atom\(s\) written twice at the same position, kept once: A ALA 1 CA"):
        conf = read_structure(path)
    once = tmp_path / "once.pdb"
    once.write_text(PEPTIDE)
    ref = read_structure(once)
    assert len(conf.layout) == len(ref.layout) == 14
    np.testing.assert_array_equal(conf.coords, ref.coords)
    assert conf.contents["ignored"]["duplicate_atoms"] == 1


def test_read_structure_says_what_it_kept_and_ignored(tmp_path, caplog):
    from structures import TRIPEPTIDE_P1_PDB as PEPTIDE

    lines = PEPTIDE.splitlines()
    extra = [
        "ATOM     15  H   GLY A   2      13.800  10.700  10.000  1.00 20.00           H",
        "HETATM   16 ZN    ZN A 101       5.000   5.000   5.000  1.00 20.00          ZN",
        "HETATM   17  O   HOH A 201       3.000   3.000   3.000  1.00 20.00           O",
        "HETATM   18  O   HOH A 202       4.000   3.000   3.000  1.00 20.00           O",
    ]
    path = tmp_path / "mixed.pdb"
    path.write_text("\n".join(lines[:-1] + extra + ["END"]) + "\n")
    with caplog.at_level("INFO", logger="ensemble_guide"):
        conf = read_structure(path)
    c = conf.contents
    assert (c["model"], c["chains"], c["atoms"], c["polymer_residues"]) == ("1", ["A"], 15, 3)
    assert c["other_residues"] == {"ZN": 1}
    assert c["ignored"]["hydrogens"] == 1 and c["ignored"]["waters"] == 2
    line = next(r.message for r in caplog.records if r.message.startswith("mixed.pdb"))
    assert "kept 15 atoms in 3 polymer residues" in line and "ZN" in line
    assert "1 hydrogen" in line and "2 waters" in line

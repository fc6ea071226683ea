"""Bad input, everywhere: every malformed file or nonsense option a user can give is an InputError with one line that
names the culprit, the app exits non-zero with that line on stderr and writes no results; anything else is a bug and
keeps its traceback.

Most cases run the app's own ``run(cfg, out_dir)`` in-process on a config composed exactly as the command line would
(fast: no interpreter start per case); three cases run the real command to check the exit code and stderr.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gemmi
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from guidance.app.job import config_dir as _config_dir, run
from observables.errors import InputError
from structures import TRIPEPTIDE_P1_PDB as PEPTIDE  # tests/structures.py

RESULTS = ("metrics.json", "ensemble.cif", "trajectory.csv", "particles.npz", "multiconformer.pdb")



def _lines(text: str, *changes: tuple[int, str]) -> str:
    """PEPTIDE with line i replaced by ``new`` (or appended when i is past the end)."""
    lines = text.splitlines()
    for i, new in changes:
        lines.insert(i, new) if i >= len(lines) else lines.__setitem__(i, new)
    return "\n".join(lines) + "\n"


def _mtz(path: Path, cell=(30, 30, 30, 90, 90, 90), columns=("FP", "SIGFP", "FreeR_flag"), types="FQI",
         n_flags: int = 20) -> Path:
    """An MTZ in P1 with the given columns on a full set of reflections to 3 A (values are arbitrary but sane)."""
    uc = gemmi.UnitCell(*cell)
    hkl = np.array(gemmi.make_miller_array(uc, gemmi.SpaceGroup("P 1"), 3.0), dtype=float)
    rng = np.random.default_rng(0)
    cols = []
    for label, kind in zip(columns, types):
        cols.append({"F": rng.uniform(10, 100, len(hkl)), "Q": np.full(len(hkl), 2.0),
                     "I": rng.integers(0, n_flags, len(hkl)).astype(float), "P": rng.uniform(-180, 180, len(hkl)),
                     "W": np.full(len(hkl), 0.8)}[kind])
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup("P 1")
    mtz.set_cell_for_all(uc)
    mtz.add_dataset("test")
    for label, kind in zip(columns, types):
        mtz.add_column(label, kind)
    mtz.set_data(np.column_stack([hkl, *cols]).astype(np.float32))
    mtz.write_to_file(str(path))
    return path


def _profile(rows) -> str:
    return "# q I sigma\n" + "".join(" ".join(str(v) for v in r) + "\n" for r in rows)


GOOD_SAXS = [(0.01 * (i + 1), 100.0 * np.exp(-((0.01 * (i + 1)) ** 2) * 100 / 3), 1.0) for i in range(40)]


def _saxs_with(i: int, row) -> str:
    rows = list(GOOD_SAXS)
    rows[i] = row
    return _profile(rows)


# (case id, files {name: text | bytes | callable(path)}, overrides, words the message must contain)
# "{name}" in an override is the path of that file in the case's folder.
CASES = [
    # --- structures
    ("structure-missing", {}, ["mode=score", "structure={dir}/nowhere.pdb"], ["nowhere.pdb"]),
    ("structure-empty", {"s.pdb": ""}, ["mode=score", "structure={s.pdb}"], ["s.pdb"]),
    ("structure-binary", {"s.cif": bytes(range(256)) * 8}, ["mode=score", "structure={s.cif}"], ["s.cif"]),
    ("structure-directory", {}, ["mode=score", "structure={dir}"], ["not a file"]),
    ("structure-not-a-structure", {"s.pdb": "hello world\nthis is not a PDB file\n"}, ["mode=score", "structure={s.pdb}"],
     ["s.pdb"]),
    ("structure-only-water", {"s.pdb": "HETATM    1  O   HOH A   1      10.000  10.000  10.000  1.00 20.00           O\nEND\n"},
     ["mode=score", "structure={s.pdb}"], ["s.pdb", "no"]),
    ("structure-duplicate-atom-moved",
     {"s.pdb": _lines(PEPTIDE, (15, "ATOM     15  CA  ALA A   3      19.600  13.920  10.000  1.00 20.00           C"),
                      (16, "END"))},
     ["mode=score", "structure={s.pdb}"], ["s.pdb", "CA", "twice", "altloc"]),
    ("structure-insertion-code",
     {"s.pdb": _lines(PEPTIDE, *[(i, PEPTIDE.splitlines()[i][:26] + "A" + PEPTIDE.splitlines()[i][27:]) for i in (10, 11, 12, 13, 14)])},
     ["mode=score", "structure={s.pdb}"], ["s.pdb", "insertion code"]),
    ("structure-truncated-cif", {"s.cif": "data_x\nloop_\n_atom_site.group_PDB\n_atom_site.id\n_atom_site.type_symbol\n"
                                          "_atom_site.label_atom_id\nATOM 1 N\n"},
     ["mode=score", "structure={s.cif}"], ["s.cif"]),
    ("reference-missing", {}, ["mode=score", "reference={dir}/ref.cif"], ["ref.cif"]),
    # --- density maps
    ("density-map-missing", {}, ["mode=score", "observables=[density]", "observables.density.map={dir}/m.ccp4"], ["m.ccp4"]),
    ("density-map-empty", {"m.ccp4": b""}, ["mode=score", "observables=[density]", "observables.density.map={m.ccp4}"],
     ["m.ccp4"]),
    ("density-map-binary", {"m.ccp4": bytes(range(256)) * 4},
     ["mode=score", "observables=[density]", "observables.density.map={m.ccp4}"], ["m.ccp4"]),
    ("density-map-text", {"m.map": "not a map\n"}, ["mode=score", "observables=[density]", "observables.density.map={m.map}"],
     ["m.map"]),
    ("density-mtz-without-map-coefficients", {"s.pdb": PEPTIDE, "m.mtz": lambda p: _mtz(p)},
     ["mode=score", "structure={s.pdb}", "observables=[density]", "observables.density.map={m.mtz}"], ["m.mtz"]),
    ("density-negative-resolution", {}, ["mode=score", "observables=[density]", "observables.density.resolution=-2"],
     ["resolution"]),
    ("density-zero-sigma", {}, ["mode=score", "observables=[density]", "observables.density.sigma=0"], ["sigma"]),
    ("density-unknown-kind", {}, ["mode=score", "observables=[density]", "observables.density.kind=neutrons"], ["kind"]),
    # --- X-ray amplitudes
    ("xray-data-missing", {"s.pdb": PEPTIDE}, ["mode=score", "structure={s.pdb}", "observables=[xray]",
                                              "observables.xray.data={dir}/f.mtz"], ["f.mtz"]),
    ("xray-data-is-a-model", {"s.pdb": PEPTIDE}, ["mode=score", "structure={s.pdb}", "observables=[xray]",
                                                 "observables.xray.data={s.pdb}"], ["s.pdb"]),
    ("xray-data-empty", {"s.pdb": PEPTIDE, "f.mtz": b""},
     ["mode=score", "structure={s.pdb}", "observables=[xray]", "observables.xray.data={f.mtz}"], ["f.mtz"]),
    ("xray-map-coefficients-only", {"s.pdb": PEPTIDE, "f.mtz": lambda p: _mtz(p, columns=("FWT", "PHWT"), types="FP")},
     ["mode=score", "structure={s.pdb}", "observables=[xray]", "observables.xray.data={f.mtz}"], ["f.mtz", "density"]),
    ("xray-other-crystal", {"s.pdb": PEPTIDE, "f.mtz": lambda p: _mtz(p, cell=(40, 41, 42, 90, 90, 90))},
     ["mode=score", "structure={s.pdb}", "observables=[xray]", "observables.xray.data={f.mtz}"],
     ["allow_other_crystal"]),
    ("xray-unknown-column", {"s.pdb": PEPTIDE, "f.mtz": lambda p: _mtz(p)},
     ["mode=score", "structure={s.pdb}", "observables=[xray]", "observables.xray.data={f.mtz}",
      "observables.xray.columns=[FOBS,SIGFOBS]"], ["FOBS"]),
    ("xray-absent-free-flag-value", {"s.pdb": PEPTIDE, "f.mtz": lambda p: _mtz(p, n_flags=2)},
     ["mode=score", "structure={s.pdb}", "observables=[xray]", "observables.xray.data={f.mtz}",
      "observables.xray.free_flag_value=7"], ["7"]),
    ("xray-unknown-target", {"s.pdb": PEPTIDE, "f.mtz": lambda p: _mtz(p)},
     ["mode=score", "structure={s.pdb}", "observables=[xray]", "observables.xray.data={f.mtz}",
      "observables.xray.target=rfree"], ["target"]),
    ("xray-cif-without-reflections", {"s.pdb": PEPTIDE, "f-sf.cif": "data_r1abcsf\n_cell.length_a 30\n"},
     ["mode=score", "structure={s.pdb}", "observables=[xray]", "observables.xray.data={f-sf.cif}"], ["f-sf.cif"]),
    # --- SAXS profiles
    ("saxs-missing", {}, ["mode=score", "observables=[saxs]", "observables.saxs.data={dir}/p.dat"], ["p.dat"]),
    ("saxs-empty", {"p.dat": ""}, ["mode=score", "observables=[saxs]", "observables.saxs.data={p.dat}"], ["p.dat"]),
    ("saxs-binary", {"p.dat": bytes(range(256)) * 8}, ["mode=score", "observables=[saxs]", "observables.saxs.data={p.dat}"],
     ["p.dat"]),
    ("saxs-no-sigma", {"p.dat": "".join(f"{q} {i}\n" for q, i, _ in GOOD_SAXS)},
     ["mode=score", "observables=[saxs]", "observables.saxs.data={p.dat}"], ["p.dat", "sigma"]),
    ("saxs-nan", {"p.dat": _saxs_with(5, (0.06, "nan", 1.0))},
     ["mode=score", "observables=[saxs]", "observables.saxs.data={p.dat}"], ["p.dat", ":7"]),
    ("saxs-negative-sigma", {"p.dat": _saxs_with(7, (0.08, 50.0, -1.0))},
     ["mode=score", "observables=[saxs]", "observables.saxs.data={p.dat}"], ["p.dat", ":9"]),
    ("saxs-zero-sigma", {"p.dat": _saxs_with(7, (0.08, 50.0, 0.0))},
     ["mode=score", "observables=[saxs]", "observables.saxs.data={p.dat}"], ["p.dat", ":9"]),
    ("saxs-duplicate-q", {"p.dat": _saxs_with(9, (0.09, 40.0, 1.0))},
     ["mode=score", "observables=[saxs]", "observables.saxs.data={p.dat}"], ["p.dat"]),
    ("saxs-too-few-points", {"p.dat": _profile(GOOD_SAXS[:6])},
     ["mode=score", "observables=[saxs]", "observables.saxs.data={p.dat}"], ["p.dat"]),
    ("saxs-unknown-q-units", {"p.dat": _profile(GOOD_SAXS)},
     ["mode=score", "observables=[saxs]", "observables.saxs.data={p.dat}", "observables.saxs.q_units=parsec"],
     ["q_units"]),
    # --- RDCs
    ("rdc-missing", {}, ["mode=score", "observables=[rdc]", "observables.rdc.data={dir}/d.pa"], ["d.pa"]),
    ("rdc-empty", {"d.pa": ""}, ["mode=score", "observables=[rdc]", "observables.rdc.data={d.pa}"], ["d.pa"]),
    ("rdc-binary", {"d.pa": bytes(range(256)) * 8}, ["mode=score", "observables=[rdc]", "observables.rdc.data={d.pa}"],
     ["d.pa"]),
    ("rdc-bad-label", {"d.pa": "2N-H 3.1\n3X-Y-Z 2.0\n"}, ["mode=score", "observables=[rdc]", "observables.rdc.data={d.pa}"],
     ["d.pa", ":2"]),
    ("rdc-value-not-a-number", {"d.pa": "2N-H 3.1\n3N-H abc\n"},
     ["mode=score", "observables=[rdc]", "observables.rdc.data={d.pa}"], ["d.pa", ":2"]),
    ("rdc-nan-value", {"d.pa": "2N-H 3.1\n3N-H nan\n"}, ["mode=score", "observables=[rdc]", "observables.rdc.data={d.pa}"],
     ["d.pa", ":2"]),
    ("rdc-negative-error", {"d.pa": "2N-H 3.1 0.5\n3N-H 2.0 -0.5\n"},
     ["mode=score", "observables=[rdc]", "observables.rdc.data={d.pa}"], ["d.pa", ":2"]),
    # --- NOE restraints
    ("noe-missing", {}, ["mode=score", "observables=[noe]", "observables.noe.restraints={dir}/r.tbl"], ["r.tbl"]),
    ("rdc-pales-missing-column", {"d.tab": "REMARK x\nVARS RESID_I ATOMNAME_I D\nFORMAT %4d %4s %9.3f\n2 N 3.1\n"},
     ["mode=score", "observables=[rdc]", "observables.rdc.data={d.tab}"], ["d.tab:2", "VARS", "RESID_J"]),
    ("rdc-pales-wrong-field-count",
     {"d.tab": "VARS RESID_I RESNAME_I ATOMNAME_I RESID_J RESNAME_J ATOMNAME_J D DD W\n"
               "2 ALA N 2 ALA HN 3.1 1.0 1.0\n3 ALA N 3 ALA HN 2.0\n"},
     ["mode=score", "observables=[rdc]", "observables.rdc.data={d.tab}"], ["d.tab:3"]),
    ("noe-no-distance-restraints",
     {"r.tbl": "assign (resid 2 and name C) (resid 3 and name N) (resid 3 and name CA) (resid 3 and name C) "
               "1.0 -60.0 10.0 2\n"},
     ["mode=score", "observables=[noe]", "observables.noe.restraints={r.tbl}"], ["r.tbl", "distance restraints"]),
    ("noe-unbalanced", {"r.tbl": "assign (resid 1 and name HA) (resid 2 and name HN 3.0 1.0 1.0\n"},
     ["mode=score", "observables=[noe]", "observables.noe.restraints={r.tbl}"], ["r.tbl"]),
    ("noe-distance-not-a-number", {"r.tbl": "assign (resid 1 and name HA) (resid 2 and name HN) 3.0 x 1.0\n"},
     ["mode=score", "observables=[noe]", "observables.noe.restraints={r.tbl}"], ["r.tbl"]),
    # --- J couplings and chemical shifts
    ("jcoupling-missing", {}, ["mode=score", "observables=[jcoupling]", "observables.jcoupling.data={dir}/j.txt"], ["j.txt"]),
    ("jcoupling-not-a-number", {"j.txt": "2 7.1\n3 seven\n"},
     ["mode=score", "observables=[jcoupling]", "observables.jcoupling.data={j.txt}"], ["j.txt"]),
    ("jcoupling-no-residue-in-the-model", {"j.txt": "200 7.1\n201 6.0\n"},
     ["mode=score", "observables=[jcoupling]", "observables.jcoupling.data={j.txt}"], ["j.txt", "200", "numbering"]),
    ("shifts-missing", {}, ["mode=score", "observables=[shifts]", "observables.shifts.data={dir}/s.str"], ["s.str"]),
    ("shifts-junk-star", {"s.str": "data_x\nloop_\n_Atom_chem_shift.ID\n"},
     ["mode=score", "observables=[shifts]", "observables.shifts.data={s.str}"], ["s.str"]),
    # --- options
    ("mode-unknown", {}, ["mode=refine"], ["mode"]),
    ("ensemble-size-zero", {}, ["ensemble_size=0"], ["ensemble_size"]),
    ("structure-unknown-element",
     {"s.pdb": _lines(PEPTIDE, (5, PEPTIDE.splitlines()[5][:76] + "QX")),
      "p.dat": _profile([(0.01 * k, 100.0 * np.exp(-0.02 * k), 1.0) for k in range(1, 31)])},
     ["mode=score", "structure={s.pdb}", "observables=[saxs]", "observables.saxs.data={p.dat}"],
     ["CB of ALA A1", "unknown element"]),
    ("noe-restraints-match-no-atom", {"r.tbl": "assign (resid 90 and name HA) (resid 91 and name HN) 3.0 1.0 1.0\n"},
     ["mode=score", "observables=[noe]", "observables.noe.restraints={r.tbl}"], ["r.tbl", "none of the 1 restraints"]),
    ("noe-unknown-averaging", {"r.tbl": "assign (resid 1 and name HA) (resid 2 and name H) 3.0 1.0 1.0\n"},
     ["mode=score", "observables=[noe]", "observables.noe.restraints={r.tbl}", "observables.noe.averaging=r-4"],
     ["averaging", "r-4"]),
    ("jcoupling-unknown-karplus", {"j.txt": "2 7.1\n3 6.0\n"},
     ["mode=score", "observables=[jcoupling]", "observables.jcoupling.data={j.txt}",
      "observables.jcoupling.karplus=smith_2020"], ["smith_2020", "Karplus"]),
    ("shifts-unknown-nucleus", {"s.str": "data_x\n"},
     ["mode=score", "observables=[shifts]", "observables.shifts.data={s.str}", "observables.shifts.nuclei=[CA,P]"],
     ["nuclei"]),
    ("conformer-unknown", {}, ["predictor.conformers=[Z]"], ["Z"]),
    ("observable-option-unknown", {}, ["mode=score", "observables=[saxs]", "+observables.saxs.qmax=0.3"], ["qmax"]),
    ("predictor-option-unknown", {}, ["+predictor.temperature=2"], ["predictor.temperature", "--cfg job"]),
    ("predictor-unknown", {}, ["predictor.name=alphafold9"], ["alphafold9", "reference"]),
]


@pytest.fixture(scope="module")
def config_dir():
    with initialize_config_dir(config_dir=_config_dir(), version_base="1.3"):
        yield


def _materialise(tmp_path: Path, files: dict, overrides: list[str]) -> list[str]:
    paths = {"dir": str(tmp_path)}
    for name, content in files.items():
        p = tmp_path / name
        if callable(content):
            content(p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        paths[name] = str(p)
    out = []
    for o in overrides:
        for key, value in paths.items():
            o = o.replace("{" + key + "}", value)
        out.append(o)
    return out


def test_the_battery_has_at_least_40_cases():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, tmp_path, config_dir):
    name, files, overrides, words = case
    overrides = _materialise(tmp_path, files, overrides)
    out = tmp_path / "run"
    out.mkdir()
    cfg = compose("run", overrides=overrides)
    with pytest.raises(InputError) as info:
        run(cfg, out)
    message = str(info.value)
    assert message.strip(), "empty message"
    assert "\n" not in message.strip(), f"more than one line: {message!r}"
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    left = [r for r in RESULTS if (out / r).exists()]
    assert not left, f"results written despite the error: {left}"


def _app(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guidance.app", *args], capture_output=True, text=True, timeout=300)


def test_the_app_reports_an_input_error_in_one_line_and_exits_1(tmp_path):
    bad = tmp_path / "p.dat"
    bad.write_text(_saxs_with(7, (0.08, 50.0, -1.0)))
    out = tmp_path / "run"
    proc = _app("mode=score", "observables=[saxs]", f"observables.saxs.data={bad}", f"hydra.run.dir={out}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "p.dat" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.json").exists()


def test_the_app_reports_a_bad_structure_in_one_line(tmp_path):
    out = tmp_path / "run"
    proc = _app("mode=score", f"structure={tmp_path / 'missing.cif'}", f"hydra.run.dir={out}")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "missing.cif" in errors[0]
    assert "Traceback" not in proc.stderr and not (out / "metrics.json").exists()


def test_a_bug_keeps_its_traceback(tmp_path):
    """A ValueError that is not an InputError (here planted in the structure reader) is a bug: the traceback shows."""
    child = ("import sys, guidance.structures.io as s\n"
             "def broken(*a, **k):\n    raise ValueError('planted bug')\n"
             "s.read_structure = broken\n"
             "import guidance.app.job as r\nr.read_structure = broken\n"
             "sys.argv = ['ensemble-guide'] + sys.argv[1:]\nr.main()\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", child, "mode=score", f"hydra.run.dir={out}"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "planted bug" in proc.stderr
    assert not (out / "metrics.json").exists()

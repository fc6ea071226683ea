"""Small structure files and inputs shared by the predictor tests (Boltz, Protenix)."""

from pathlib import Path

import numpy as np

# SEQRES names five residues (MET GLY SER TRP LYS) while only GLY 11 and SER 12 (with a C-terminal OXT) are modelled,
# numbered from 11: predictors must take the sequence from SEQRES and keep the file's numbering.
SEQRES_PDB = """\
SEQRES   1 A    5  MET GLY SER TRP LYS
ATOM      1  N   GLY A  11       0.000   0.000   0.000  1.00  0.00           N
ATOM      2  CA  GLY A  11       1.450   0.000   0.000  1.00  0.00           C
ATOM      3  C   GLY A  11       2.000   1.400   0.000  1.00  0.00           C
ATOM      4  O   GLY A  11       1.300   2.400   0.000  1.00  0.00           O
ATOM      5  N   SER A  12       3.300   1.500   0.000  1.00  0.00           N
ATOM      6  CA  SER A  12       4.000   2.800   0.000  1.00  0.00           C
ATOM      7  C   SER A  12       5.500   2.600   0.000  1.00  0.00           C
ATOM      8  O   SER A  12       6.000   1.500   0.000  1.00  0.00           O
ATOM      9  CB  SER A  12       3.600   3.700   1.200  1.00  0.00           C
ATOM     10  OG  SER A  12       4.000   3.100   2.400  1.00  0.00           O
ATOM     11  OXT SER A  12       6.100   3.600   0.000  1.00  0.00           O
END
"""


def two_state_inputs(root: Path):
    """The demo's two-state peptide written to ``root`` as an altloc structure (occupancies 0.6/0.4) with a synthetic
    3 A map of that mixture: (peptide, structure path, map path)."""
    from guidance.fixtures import build_two_state_peptide, write_two_state_structure
    from observables.base import AtomInfo
    from observables.density import synthetic_map, write_ccp4

    pep = build_two_state_peptide()
    structure = write_two_state_structure(root / "two_state.pdb", pep, occupancies=(0.6, 0.4))
    dmap = synthetic_map(AtomInfo.from_layout(pep.layout), np.stack([pep.coords_a, pep.coords_b]), [0.6, 0.4],
                         resolution=3.0)
    return pep, structure, write_ccp4(root / "two_state.ccp4", dmap)


# A three-residue peptide in a 30 A P1 cell (coordinates from an ideal extended chain; only the file's shape matters)
TRIPEPTIDE_P1_PDB = """\
CRYST1   30.000   30.000   30.000  90.00  90.00  90.00 P 1           1
ATOM      1  N   ALA A   1      10.000  10.000  10.000  1.00 20.00           N
ATOM      2  CA  ALA A   1      11.458  10.000  10.000  1.00 20.00           C
ATOM      3  C   ALA A   1      12.009  11.420  10.000  1.00 20.00           C
ATOM      4  O   ALA A   1      11.251  12.390  10.000  1.00 20.00           O
ATOM      5  CB  ALA A   1      11.990   9.220  11.200  1.00 20.00           C
ATOM      6  N   GLY A   2      13.332  11.540  10.000  1.00 20.00           N
ATOM      7  CA  GLY A   2      13.971  12.850  10.000  1.00 20.00           C
ATOM      8  C   GLY A   2      15.480  12.730  10.000  1.00 20.00           C
ATOM      9  O   GLY A   2      16.040  11.630  10.000  1.00 20.00           O
ATOM     10  N   ALA A   3      16.150  13.870  10.000  1.00 20.00           N
ATOM     11  CA  ALA A   3      17.600  13.920  10.000  1.00 20.00           C
ATOM     12  C   ALA A   3      18.100  15.350  10.000  1.00 20.00           C
ATOM     13  O   ALA A   3      17.330  16.310  10.000  1.00 20.00           O
ATOM     14  CB  ALA A   3      18.120  13.150  11.210  1.00 20.00           C
END
"""

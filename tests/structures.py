"""Small structure files shared by the predictor tests (Boltz, Protenix)."""

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

"""Structures as files and as arrays: reading and writing PDB/mmCIF (io), multiconformer <-> ensemble conversion
(multiconf), covalent geometry restraints (geometry), comparisons with reference states (metrics) and model maps
computed by gemmi for synthetic data and evaluation (maps), an ensemble against altlocs (altlocs).  numpy and gemmi:
no JAX, no Hydra."""

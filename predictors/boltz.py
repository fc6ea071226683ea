"""Boltz-1 and Boltz-2 (the ``boltz`` package, pinned to 2.2.1) behind the denoising interface.

Everything is done offline, with Boltz's own parser, tokenizer and featurizer called directly (not through its
Dataset, which retries forever on a bad input):

    input (sequences or a structure file) -> Boltz schema -> parse_boltz_schema -> tokenize -> featurize -> collate
    -> trunk once under no_grad (input embedder, recycling_steps + 1 passes of [templates], MSA module, pairformer;
       Boltz-2 also its diffusion conditioning) -> denoise(x, sigma) = score network's preconditioned forward.

Boltz pads the atoms of a structure to a multiple of its attention window (32): ``denoise`` pads with zeros and
returns the real atoms only.  Boltz orders chains by entity (identical sequences are grouped), residues by sequence
and atoms by its reference atom lists (``boltz.data.const.ref_atoms``: heavy atoms, no OXT); the layout says so, and
atoms are matched to a structure file by (chain, residue number, atom name).

Boltz samples with random rotation/translation augmentation each step and aligns the noisy structure to the
denoised one (``alignment_reverse_diff``): ``needs_augmentation`` and ``needs_alignment`` tell the sampler.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from predictors.base import AtomLayout, NoiseSchedule

__all__ = [
    "Boltz1Denoiser",
    "Boltz2Denoiser",
    "BoltzDenoiser",
    "BoltzPotentials",
    "boltz_schedule",
    "load_boltz",
    "make_denoiser",
    "method_for_observables",
    "sequences_from_structure",
    "tiny_model",
    "unmatched_atoms",
]

log = logging.getLogger(__name__)

FAMILIES = ("boltz1", "boltz2")
# The file names Boltz's own CLI downloads into its cache (``boltz predict`` -> ~/.boltz).
CHECKPOINT_NAMES = {"boltz1": "boltz1_conf.ckpt", "boltz2": "boltz2_conf.ckpt"}
# Boltz-2 method conditioning for each kind of experimental data (values are keys of const.method_types_ids).
METHOD_FOR_DATA = {"density": "x-ray diffraction", "saxs": "solution scattering", "noe": "solution nmr",
                   "jcoupling": "solution nmr", "shifts": "solution nmr", "rdc": "solution nmr", "nmr": "solution nmr"}


def method_for_observables(names) -> str | None:
    """The Boltz-2 method conditioning for a run's observables: the first one with a known data type, else None
    (Boltz's default)."""
    for name in names:
        if str(name) in METHOD_FOR_DATA:
            return METHOD_FOR_DATA[str(name)]
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Schedules and checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def _diffusion_params(family: str):
    from boltz.main import Boltz2DiffusionParams, BoltzDiffusionParams

    _check_family(family)
    return BoltzDiffusionParams() if family == "boltz1" else Boltz2DiffusionParams()


def boltz_schedule(family: str) -> NoiseSchedule:
    """The sampling parameters Boltz's CLI uses for this family, read from Boltz's own parameter classes."""
    p = _diffusion_params(family)
    return NoiseSchedule(sigma_data=float(p.sigma_data), sigma_max=float(p.sigma_max), sigma_min=float(p.sigma_min),
                         rho=float(p.rho), gamma_0=float(p.gamma_0), gamma_min=float(p.gamma_min),
                         noise_scale=float(p.noise_scale), step_scale=float(p.step_scale))


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown Boltz family {family!r}; use one of {FAMILIES}")


def load_boltz(family: str, checkpoint, *, device="cpu", recycling_steps: int = 3, pairformer_args: dict | None = None,
               msa_args: dict | None = None, use_kernels: bool | None = None):
    """Load a Boltz checkpoint exactly as ``boltz predict`` does (``load_from_checkpoint`` with its predict,
    diffusion, pairformer, MSA and steering arguments, EMA off), in eval mode on ``device``.

    ``pairformer_args`` / ``msa_args`` default to Boltz's CLI dataclasses (PairformerArgs / PairformerArgsV2,
    MSAModuleArgs); tests pass small ones for tiny models.  Kernels (cuequivariance) are off on CPU.  Boltz's own
    steering potentials are switched off: guidance is ours.
    """
    from boltz.main import MSAModuleArgs, PairformerArgs, PairformerArgsV2

    _check_family(family)
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{family} checkpoint not found: {path}. Get the official weights with Boltz's CLI, e.g. "
            f"`boltz predict <any input.yaml> --model {family}` (it downloads {CHECKPOINT_NAMES[family]} to ~/.boltz), "
            "or from the Boltz release on GitHub (jwohlwend/boltz) / Hugging Face (boltz-community); "
            "then set predictor.checkpoint to that file."
        )
    if use_kernels is None:
        use_kernels = torch.device(device).type == "cuda"
    if pairformer_args is None:
        pairformer_args = asdict(PairformerArgsV2() if family == "boltz2" else PairformerArgs())
    if msa_args is None:
        msa_args = asdict(MSAModuleArgs(use_paired_feature=family == "boltz2"))
    steering = _steering_off()
    predict_args = {"recycling_steps": recycling_steps, "sampling_steps": 200, "diffusion_samples": 1,
                    "max_parallel_samples": 1, "write_confidence_summary": False, "write_full_pae": False,
                    "write_full_pde": False}
    if family == "boltz2":
        from boltz.model.models.boltz2 import Boltz2 as cls
    else:
        from boltz.model.models.boltz1 import Boltz1 as cls
    try:
        model = cls.load_from_checkpoint(
            str(path), strict=True, predict_args=predict_args, map_location=str(device),
            diffusion_process_args=asdict(_diffusion_params(family)), ema=False, use_kernels=use_kernels,
            pairformer_args=pairformer_args, msa_args=msa_args, steering_args=steering,
        )
    except (RuntimeError, KeyError, TypeError, AttributeError, pickle.UnpicklingError) as exc:
        raise ValueError(
            f"{path} could not be loaded as a {family} checkpoint ({type(exc).__name__}: {str(exc)[:300]}). "
            f"Is it the official {CHECKPOINT_NAMES[family]} of this family?"
        ) from exc
    return model.eval().to(device)


def _steering_off() -> dict:
    """Boltz's CLI steering arguments with every steering mechanism switched off (guidance is ours)."""
    from boltz.main import BoltzSteeringParams

    steering = asdict(BoltzSteeringParams())
    steering.update(fk_steering=False, physical_guidance_update=False, contact_guidance_update=False)
    return steering


# Toy widths/depths for tiny randomly initialised models (tests, benchmarks, trying the plumbing without weights).
TINY_PAIRFORMER = dict(num_blocks=1, num_heads=2, dropout=0.0, pairwise_head_width=8, pairwise_num_heads=2)
TINY_MSA = dict(msa_s=8, msa_blocks=1, msa_dropout=0.0, z_dropout=0.0, pairwise_head_width=8, pairwise_num_heads=2)


def tiny_model(family: str, seed: int = 0):
    """A randomly initialised Boltz model with the released architecture at toy width/depth (no weights needed).
    Its checkpoint loads through ``load_boltz`` with ``pairformer_args=TINY_PAIRFORMER`` (+ ``v2=True`` for
    Boltz-2) and ``msa_args=TINY_MSA``."""
    from boltz.main import Boltz2DiffusionParams, BoltzDiffusionParams
    from omegaconf import OmegaConf

    _check_family(family)
    torch.manual_seed(seed)
    # Boltz-2's checkpoint hook expects training_args as a DictConfig
    training_args = OmegaConf.create(dict(max_lr=1e-3, weight_decay=0.0, diffusion_multiplicity=1, recycling_steps=0))
    common = dict(
        atom_s=16, atom_z=8, token_s=32, token_z=16, num_bins=64, training_args=training_args, validation_args={},
        embedder_args=dict(atom_encoder_depth=1, atom_encoder_heads=2), msa_args=dict(TINY_MSA),
        score_model_args=dict(sigma_data=16, dim_fourier=16, atom_encoder_depth=1, atom_encoder_heads=2,
                              token_transformer_depth=1, token_transformer_heads=2, atom_decoder_depth=1,
                              atom_decoder_heads=2, conditioning_transition_layers=1),
        diffusion_loss_args={},
        predict_args=dict(recycling_steps=0, sampling_steps=5, diffusion_samples=1, max_parallel_samples=1),
        steering_args=_steering_off(), use_kernels=False, atoms_per_window_queries=32, atoms_per_window_keys=128,
    )
    if family == "boltz1":  # atom features: 389 (Boltz-1), 388 (Boltz-2)
        from boltz.model.models.boltz1 import Boltz1

        model = Boltz1(**common, atom_feature_dim=389, pairformer_args=dict(TINY_PAIRFORMER),
                       diffusion_process_args=asdict(BoltzDiffusionParams()), confidence_model_args={},
                       confidence_prediction=False)
    else:
        from boltz.model.models.boltz2 import Boltz2

        model = Boltz2(**common, atom_feature_dim=388, pairformer_args=dict(TINY_PAIRFORMER, v2=True),
                       diffusion_process_args=asdict(Boltz2DiffusionParams()), confidence_prediction=False,
                       validate_structure=False)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def _check_sequence(chain: str, seq: str) -> str:
    from boltz.data import const

    seq = seq.strip().upper()
    standard = {letter for letter, res in const.prot_letter_to_token.items() if res in const.canonical_tokens
                and res != "UNK"}
    bad = sorted({(i + 1, c) for i, c in enumerate(seq) if c not in standard})
    if bad:
        listed = ", ".join(f"{c!r} at position {i}" for i, c in bad[:10])
        raise ValueError(
            f"chain {chain}: non-standard residue(s) {listed}: only the 20 standard amino acids are supported; "
            "replace them by their parent amino acid (e.g. MSE -> M) in the input"
        )
    if not seq:
        raise ValueError(f"chain {chain}: empty sequence")
    return seq


def resolve_input(input) -> tuple[dict[str, str], dict[str, list[int]], Path | None]:
    """A predictor's input, ``{chain: one-letter sequence}`` or a structure file, as (sequences, residue numbers per
    chain, the structure's path or None).  Sequences given directly are numbered from 1."""
    if isinstance(input, dict):
        seqs = {str(c): _check_sequence(str(c), s) for c, s in input.items()}
        return seqs, {c: list(range(1, len(s) + 1)) for c, s in seqs.items()}, None
    seqs, raw = sequences_from_structure(input)
    return seqs, {c: _layout_numbers(v) for c, v in raw.items()}, Path(input)


def resolve_msa_paths(seqs: dict[str, str], msa) -> dict[str, str]:
    """``msa``: "none"/None (single-sequence mode), one .a3m path (for every chain; they must share one sequence) or
    ``{chain: path}`` -> ``{chain: path}``, every file checked to exist."""
    if isinstance(msa, dict):
        paths = {str(c): str(Path(p).expanduser()) for c, p in msa.items()}
    elif msa is None or str(msa).lower() == "none":
        return {}
    else:
        if len(set(seqs.values())) > 1:
            raise ValueError(f"msa={msa}: one MSA file for chains with different sequences; give one per chain, "
                             "{chain: path.a3m}")
        paths = {c: str(Path(msa).expanduser()) for c in seqs}
    for c, p in paths.items():
        if not Path(p).is_file():
            raise FileNotFoundError(f"MSA for chain {c} not found: {p}")
    return paths


def sequences_from_structure(path) -> tuple[dict[str, str], dict[str, list[int | None]]]:
    """Protein chains of a structure file: {chain: sequence} and, per chain, the file's residue number of each
    sequence position (None where the residue is not modelled).

    The sequence is the entity's full sequence (SEQRES / entity_poly) when the file has one, aligned to the modelled
    residues; else the modelled residues themselves.  Residues that are not standard amino acids raise ValueError.
    """
    import gemmi
    from boltz.data import const

    st = gemmi.read_structure(str(path))
    st.setup_entities()
    model = st[0]
    seqs, numbers = {}, {}
    skipped = []
    for chain in model:
        polymer = chain.get_polymer()
        ligands = sorted({r.name for r in chain.get_ligands()})
        if ligands:
            skipped.append(f"chain {chain.name} ligands {', '.join(ligands[:5])}")
        if len(polymer) == 0 or polymer.check_polymer_type() not in (gemmi.PolymerType.PeptideL,
                                                                     gemmi.PolymerType.Unknown):
            if len(polymer):
                skipped.append(f"chain {chain.name} ({polymer.check_polymer_type().name} polymer)")
            continue
        names = [r.name for r in polymer]
        resnums = [r.seqid.num for r in polymer]
        bad = [f"{n} {chain.name}{r.seqid.num}{r.seqid.icode.strip()}" for n, r in zip(names, polymer)
               if n not in const.prot_token_to_letter or n == "UNK"]
        if bad:
            raise ValueError(f"{path}: non-standard residue(s) {', '.join(bad[:10])}: only the 20 standard amino "
                             "acids are supported; replace them by their parent amino acid (e.g. MSE -> MET)")
        full = None
        entity = st.get_entity_of(polymer)
        if entity is not None and entity.full_sequence:
            full = [gemmi.Entity.first_mon(m) for m in entity.full_sequence]
        if full and all(n in const.prot_token_to_letter and n != "UNK" for n in full):
            pos = _align_modelled(full, polymer)
            if pos is not None:
                nums: list[int | None] = [None] * len(full)
                for p, num in zip(pos, resnums):
                    nums[p] = num
                seqs[chain.name] = "".join(const.prot_token_to_letter[n] for n in full)
                numbers[chain.name] = nums
                continue
        seqs[chain.name] = "".join(const.prot_token_to_letter[n] for n in names)
        numbers[chain.name] = resnums
    if not seqs:
        raise ValueError(f"{path}: no protein chain found")
    if skipped:
        log.warning("%s: only protein chains are modelled; not modelled: %s", path, "; ".join(skipped))
    return seqs, numbers


def _align_modelled(full: list[str], polymer) -> list[int] | None:
    """Positions in the full sequence of the modelled residues, from label_seq (mmCIF) or a sequence alignment."""
    import gemmi

    label = [r.label_seq for r in polymer]
    if all(v is not None for v in label) and all(1 <= v <= len(full) for v in label):
        pos = [v - 1 for v in label]
        if all(full[p] == r.name for p, r in zip(pos, polymer)):
            return pos
    result = gemmi.align_sequence_to_polymer(full, polymer, gemmi.PolymerType.PeptideL)
    # Walk the alignment (CIGAR): M consumes both, I only the full sequence, D only the model.
    pos, i, j = [], 0, 0
    for item in result.cigar_str().replace("M", "M ").replace("I", "I ").replace("D", "D ").split():
        count, op = int(item[:-1]), item[-1]
        if op == "M":
            pos.extend(range(i, i + count))
            i += count
            j += count
        elif op == "I":
            i += count
        else:
            return None  # a modelled residue the full sequence does not have
    if len(pos) != len(polymer) or any(full[p] != r.name for p, r in zip(pos, polymer)):
        return None
    return pos


def _layout_numbers(numbers: list[int | None]) -> list[int]:
    """Residue numbers for every sequence position: the file's for modelled residues, extrapolated from the nearest
    modelled neighbour for the others (moved past the chain's numbers if that would collide)."""
    n = len(numbers)
    known = [i for i, v in enumerate(numbers) if v is not None]
    if not known:
        return list(range(1, n + 1))
    used = {v for v in numbers if v is not None}
    out, spare = [], max(used) + 1000
    for i, v in enumerate(numbers):
        if v is None:
            k = min(known, key=lambda q: abs(q - i))
            v = numbers[k] + (i - k)
            if v in used:
                v = spare + i
            used.add(v)
        out.append(v)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Components (reference conformers)
# ---------------------------------------------------------------------------------------------------------------------


def _rdkit_amino_acid(res_name: str):
    """A standard amino acid built with RDKit: heavy atoms named from the PDB residue info, one embedded conformer
    named "Computed" (Boltz's name for a computed reference conformer)."""
    from boltz.data import const
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSequence(const.prot_token_to_letter[res_name]))
    AllChem.EmbedMolecule(mol, randomSeed=0)
    mol = Chem.RemoveHs(mol)
    for atom in mol.GetAtoms():
        atom.SetProp("name", atom.GetPDBResidueInfo().GetName().strip())
    for conf in mol.GetConformers():
        conf.SetProp("name", "Computed")
    return mol


def load_components(family: str, cache_dir) -> dict:
    """{residue name: RDKit Mol} for the standard amino acids: Boltz's component files in ``cache_dir`` (ccd.pkl for
    Boltz-1, mols/ for Boltz-2) when present, else built with RDKit (with a warning)."""
    from boltz.data import const

    amino_acids = [res for res in const.canonical_tokens if res in const.prot_token_to_letter and res != "UNK"]
    if has_components(family, cache_dir):
        cache = Path(cache_dir).expanduser()
        if family == "boltz1":
            with open(cache / "ccd.pkl", "rb") as fh:
                return pickle.load(fh)
        from boltz.data.mol import load_molecules

        return load_molecules(str(cache / "mols"), amino_acids)
    wanted = "ccd.pkl" if family == "boltz1" else "mols/"
    warnings.warn(
        f"Boltz component files ({wanted}) not found in cache_dir={cache_dir}: building the standard amino acids with "
        "RDKit; reference conformers are approximate. Run `boltz predict` once to download them to ~/.boltz.",
        stacklevel=3,
    )
    return {res: _rdkit_amino_acid(res) for res in amino_acids}


def has_components(family: str, cache_dir) -> bool:
    """Whether ``cache_dir`` holds Boltz's component files for this family (ccd.pkl / mols/)."""
    if cache_dir is None:
        return False
    cache = Path(cache_dir).expanduser()
    return (cache / "ccd.pkl").is_file() if family == "boltz1" else (cache / "mols").is_dir()


# ---------------------------------------------------------------------------------------------------------------------
# The denoisers
# ---------------------------------------------------------------------------------------------------------------------


class BoltzDenoiser:
    """A Boltz model conditioned once on one input, answering ``denoise(x [B, N, 3], sigma [B]) -> x0_hat``.

    ``model``: a constructed or loaded Boltz LightningModule (see ``load_boltz``).  ``input``: {chain: protein
    sequence} or a structure file path (PDB/mmCIF; protein chains).  ``msa``: "none" (single sequence), a path to an
    .a3m used for every chain, or {chain: path}.  ``method`` (Boltz-2 only): the method conditioning, e.g.
    "X-RAY DIFFRACTION"; None leaves Boltz's default.  ``seed`` seeds torch and numpy before featurizing (Boltz
    rotates reference conformers randomly).
    """

    family: str = ""
    needs_augmentation = True
    needs_alignment = True

    def __init__(self, model, input, *, cache_dir="~/.boltz", msa="none", recycling_steps: int = 3, seed: int = 0,
                 method: str | None = None, dtype=torch.float32):
        self.model = model.eval()
        self.schedule = boltz_schedule(self.family)
        self.dtype = dtype
        self.device = next(model.parameters()).device
        seqs, numbers, self.source = resolve_input(input)
        self.sequences = seqs
        self.approximate_conformers = not has_components(self.family, cache_dir)
        self.components = load_components(self.family, cache_dir)
        self.feats, self.structure = self._featurize(seqs, msa, method, seed)
        self.layout = self._layout(numbers)
        self.trunk_calls = 0
        with torch.no_grad():
            self.condition = self._trunk(int(recycling_steps))
        self._pad_mask = self.feats["atom_pad_mask"][0].bool()
        self.n_padded = int(self._pad_mask.shape[0])
        self._real = torch.nonzero(self._pad_mask).flatten()

    # -- featurization -----------------------------------------------------------------------------------------------

    def _schema(self, seqs, msa):
        msas = resolve_msa_paths(seqs, msa)
        entries = [{"protein": {"id": c, "sequence": s, "msa": msas.get(c, "empty")}} for c, s in seqs.items()]
        return {"version": 1, "sequences": entries}, msas

    def _featurize(self, seqs, msa, method, seed):
        from boltz.data import const
        from boltz.data.parse.a3m import parse_a3m
        from boltz.data.parse.schema import parse_boltz_schema
        from boltz.data.types import Input

        schema, msas = self._schema(seqs, msa)
        torch.manual_seed(seed)
        np.random.seed(seed)
        target = parse_boltz_schema("input", schema, self.components, None, boltz_2=self.family == "boltz2")
        loaded = {}
        for chain in target.record.chains:
            if chain.msa_id != -1 and chain.msa_id not in (None, "", "empty"):
                loaded[chain.chain_id] = parse_a3m(Path(chain.msa_id), taxonomy=None, max_seqs=const.max_msa_seqs)
        inp = Input(target.structure, loaded, record=target.record, residue_constraints=target.residue_constraints,
                    templates=None, extra_mols=target.extra_mols)
        rng = np.random.default_rng(seed)
        if self.family == "boltz2":
            from boltz.data.feature.featurizerv2 import Boltz2Featurizer
            from boltz.data.module.inferencev2 import collate
            from boltz.data.tokenize.boltz2 import Boltz2Tokenizer

            if method is not None and method.lower() not in const.method_types_ids:
                raise ValueError(f"unknown Boltz-2 method {method!r}; use one of {sorted(const.method_types_ids)}")
            tok = Boltz2Tokenizer().tokenize(inp)
            feats = Boltz2Featurizer().process(
                tok, random=rng, molecules=self.components, training=False, max_atoms=None, max_tokens=None,
                max_seqs=const.max_msa_seqs, pad_to_max_seqs=False, single_sequence_prop=0.0, compute_frames=True,
                inference_pocket_constraints=None, inference_contact_constraints=None,
                compute_constraint_features=True, override_method=method, compute_affinity=False)
        else:
            from boltz.data.feature.featurizer import BoltzFeaturizer
            from boltz.data.module.inference import collate
            from boltz.data.tokenize.boltz import BoltzTokenizer

            tok = BoltzTokenizer().tokenize(inp)
            feats = BoltzFeaturizer().process(
                tok, training=False, max_atoms=None, max_tokens=None, max_seqs=const.max_msa_seqs,
                pad_to_max_seqs=False, symmetries={}, compute_symmetries=False, inference_binder=None,
                inference_pocket=None, compute_constraint_features=True)
        batch = collate([feats])
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        return batch, target.structure

    def _layout(self, numbers) -> AtomLayout:
        st = self.structure
        elements = {(res, a.GetProp("name")): a.GetSymbol() for res in set(st.residues["name"].tolist())
                    if res in self.components for a in self.components[res].GetAtoms() if a.HasProp("name")}
        chain_id, res_seq, res_name, atom_name, element = [], [], [], [], []
        for chain in st.chains:
            cname = str(chain["name"])
            nums = numbers[cname]
            for res in st.residues[chain["res_idx"]: chain["res_idx"] + chain["res_num"]]:
                for atom in st.atoms[res["atom_idx"]: res["atom_idx"] + res["atom_num"]]:
                    name = _atom_name(atom["name"])
                    chain_id.append(cname)
                    res_seq.append(nums[int(res["res_idx"])])
                    res_name.append(str(res["name"]))
                    atom_name.append(name)
                    element.append(elements.get((str(res["name"]), name), name[0]))
        return AtomLayout(np.array(chain_id), np.array(res_seq), np.array(res_name), np.array(atom_name),
                          np.array(element))

    # -- conditioning ------------------------------------------------------------------------------------------------

    def _trunk(self, recycling_steps: int) -> dict:
        raise NotImplementedError

    def _embed(self):
        m, feats = self.model, self.feats
        s_inputs = m.input_embedder(feats)
        s_init = m.s_init(s_inputs)
        z_init = m.z_init_1(s_inputs)[:, :, None] + m.z_init_2(s_inputs)[:, None, :]
        rel = m.rel_pos(feats)
        z_init = z_init + rel + m.token_bonds(feats["token_bonds"].float())
        return s_inputs, s_init, z_init, rel

    # -- denoising ---------------------------------------------------------------------------------------------------

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """x0_hat [B, N, 3] for x [B, N, 3] (real atoms, layout order) and sigma [B] (or a scalar), in Angstrom."""
        n = len(self.layout)
        if x.ndim != 3 or x.shape[1:] != (n, 3):
            raise ValueError(f"x must have shape [B, {n}, 3] for this predictor's {n} atoms, got {tuple(x.shape)}")
        full = x.new_zeros(x.shape[0], self.n_padded, 3).index_copy(1, self._real.to(x.device), x)
        return self.denoise_padded(full, sigma)[:, self._real.to(x.device)]

    def denoise_padded(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The score network on Boltz's padded atom array x [B, n_padded, 3] (pads are masked by the network)."""
        batch = x.shape[0]
        s = torch.as_tensor(sigma, dtype=self.dtype, device=self.device).reshape(-1)
        s = s.expand(batch) if s.numel() == 1 else s
        if s.numel() != batch:
            raise ValueError(f"sigma must be a scalar or have one entry per sample ({batch}), got {tuple(s.shape)}")
        out = self._network(x.to(device=self.device, dtype=self.dtype), s, batch)
        return out.to(x.dtype)

    def _network(self, x, sigma, batch):
        raise NotImplementedError

    # -- steering potentials -----------------------------------------------------------------------------------------

    def potentials(self, names=None) -> "BoltzPotentials":
        """Boltz's physical steering potentials on this input (all of them by default): see BoltzPotentials."""
        return BoltzPotentials(self, names)


def _atom_name(raw) -> str:
    if isinstance(raw, (np.ndarray, list, tuple)):  # Boltz-1 stores names as 4 int8 (ord(c) - 32)
        return "".join(chr(int(c) + 32) for c in raw if int(c) != 0).strip()
    return str(raw).strip()


class Boltz1Denoiser(BoltzDenoiser):
    family = "boltz1"

    def _trunk(self, recycling_steps):
        m, feats = self.model, self.feats
        s_inputs, s_init, z_init, rel = self._embed()
        s, z = torch.zeros_like(s_init), torch.zeros_like(z_init)
        mask = feats["token_pad_mask"].float()
        pair_mask = mask[:, :, None] * mask[:, None, :]
        for _ in range(recycling_steps + 1):  # as Boltz1.forward
            s = s_init + m.s_recycle(m.s_norm(s))
            z = z_init + m.z_recycle(m.z_norm(z))
            if not m.no_msa:
                z = z + m.msa_module(z, s_inputs, feats, use_kernels=m.use_kernels)
            s, z = m.pairformer_module(s, z, mask=mask, pair_mask=pair_mask, use_kernels=m.use_kernels)
            self.trunk_calls += 1
        self._caches: dict[int, dict] = {}  # model_cache holds multiplicity-expanded biases: one per batch size
        return {"s_trunk": s.detach(), "z_trunk": z.detach(), "s_inputs": s_inputs.detach(),
                "relative_position_encoding": rel.detach(), "feats": feats}

    def _network(self, x, sigma, batch):
        sm = self.model.structure_module
        kwargs = dict(self.condition, multiplicity=batch)
        kwargs["model_cache"] = self._caches.setdefault(batch, {}) if sm.use_inference_model_cache else None
        out, _ = sm.preconditioned_network_forward(x, sigma, network_condition_kwargs=kwargs, training=False)
        return out


class Boltz2Denoiser(BoltzDenoiser):
    family = "boltz2"

    def _trunk(self, recycling_steps):
        m, feats = self.model, self.feats
        s_inputs, s_init, z_init, rel = self._embed()
        if m.bond_type_feature:
            z_init = z_init + m.token_bonds_type(feats["type_bonds"].long())
        z_init = z_init + m.contact_conditioning(feats)
        s, z = torch.zeros_like(s_init), torch.zeros_like(z_init)
        mask = feats["token_pad_mask"].float()
        pair_mask = mask[:, :, None] * mask[:, None, :]
        for _ in range(recycling_steps + 1):  # as Boltz2.forward
            s = s_init + m.s_recycle(m.s_norm(s))
            z = z_init + m.z_recycle(m.z_norm(z))
            if m.use_templates:
                z = z + m.template_module(z, feats, pair_mask, use_kernels=m.use_kernels)
            z = z + m.msa_module(z, s_inputs, feats, use_kernels=m.use_kernels)
            s, z = m.pairformer_module(s, z, mask=mask, pair_mask=pair_mask, use_kernels=m.use_kernels)
            self.trunk_calls += 1
        q, c, to_keys, enc_bias, dec_bias, trans_bias = m.diffusion_conditioning(
            s_trunk=s, z_trunk=z, relative_position_encoding=rel, feats=feats)
        cond = {"q": q, "c": c, "to_keys": to_keys, "atom_enc_bias": enc_bias, "atom_dec_bias": dec_bias,
                "token_trans_bias": trans_bias}
        return {"s_trunk": s.float().detach(), "s_inputs": s_inputs.float().detach(), "feats": feats,
                "diffusion_conditioning": {k: (v.detach() if torch.is_tensor(v) else v) for k, v in cond.items()}}

    def _network(self, x, sigma, batch):
        sm = self.model.structure_module
        return sm.preconditioned_network_forward(x, sigma, network_condition_kwargs=dict(self.condition,
                                                                                          multiplicity=batch))


# ---------------------------------------------------------------------------------------------------------------------
# Boltz's physical steering potentials
# ---------------------------------------------------------------------------------------------------------------------

# Our names for the potentials ``boltz.model.potentials.potentials.get_potentials`` builds for FK steering / physical
# guidance (the contact and template potentials need inference constraints and templates, which we do not use).
POTENTIAL_NAMES = {
    "SymmetricChainCOMPotential": "chain_com",  # identical chains' centres of mass kept apart (flat bottom)
    "VDWOverlapPotential": "vdw_overlap",  # inter-chain van der Waals overlap (clashes)
    "ConnectionsPotential": "connections",  # covalent connections between chains/residues (bond length <= 2 A)
    "PoseBustersPotential": "posebusters",  # RDKit distance-geometry bounds: bonds, angles, intra-ligand clashes
    "ChiralAtomPotential": "chiral",  # chiral centres' improper dihedral sign
    "StereoBondPotential": "stereo_bond",  # E/Z double-bond dihedrals
    "PlanarBondPotential": "planar_bond",  # planarity around double bonds
}


class BoltzPotentials:
    """Boltz's own physical steering energies on this denoiser's input, as a differentiable torch function of the
    real atoms' coordinates.

    ``energy(x [B, N, 3], t)`` -> (E [B], {name: E_name [B]}): the sum over the selected potentials of Boltz's
    ``resampling_weight(t) * potential.compute(...)`` -- exactly the energy Boltz's FK steering resamples on (flat-
    bottom violations in A or rad, dimensionless weights) -- with ``t`` Boltz's steering time (1 at the start of the
    run, 0 at the end; its schedules switch some terms off late).  ``energy_and_grad`` adds dE/dx by autograd through
    Boltz's ``compute``: the exact gradient of the energy that is weighed.  (Boltz's own ``compute_gradient`` agrees
    for the clash term but spreads the chain-COM gradient unscaled over each chain's atoms; its COM is
    ``scatter_reduce("mean")`` including the zero it starts from, sum / (n + 1), so the exact per-atom gradient is
    1 / (n + 1) of Boltz's.  tests/test_boltz.py checks both relations.)
    """

    def __init__(self, denoiser: "BoltzDenoiser", names=None):
        from boltz.model.potentials.potentials import get_potentials

        steering = {"fk_steering": True, "physical_guidance_update": False, "contact_guidance_update": False}
        built = {POTENTIAL_NAMES[type(p).__name__]: p
                 for p in get_potentials(steering, boltz2=denoiser.family == "boltz2")
                 if type(p).__name__ in POTENTIAL_NAMES}
        names = list(built) if names is None else [str(n) for n in names]
        unknown = [n for n in names if n not in built]
        if unknown:
            raise ValueError(f"unknown Boltz potential(s) {unknown}; available: {', '.join(built)}")
        self.names = names
        self.potentials = {n: built[n] for n in names}
        self.denoiser = denoiser
        self.feats = denoiser.feats

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        d = self.denoiser
        real = d._real.to(x.device)
        return x.new_zeros(x.shape[0], d.n_padded, 3).index_copy(1, real, x)

    def energy(self, x: torch.Tensor, t: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(self.denoiser.layout)
        if x.ndim != 3 or x.shape[1:] != (n, 3):
            raise ValueError(f"x must have shape [B, {n}, 3], got {tuple(x.shape)}")
        xp = self._pad(x.float())
        parts = {}
        for name, pot in self.potentials.items():
            params = pot.compute_parameters(float(t))
            weight = float(params["resampling_weight"])
            parts[name] = weight * pot.compute(xp, self.feats, params) if weight > 0 else xp.new_zeros(x.shape[0])
        total = sum(parts.values()) if parts else xp.new_zeros(x.shape[0])
        return total.to(x.dtype), {k: v.detach().to(x.dtype) for k, v in parts.items()}

    def energy_and_grad(self, x: torch.Tensor, t: float = 0.0):
        """(E [B], dE/dx [B, N, 3], {name: E_name [B]})."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            total, parts = self.energy(xg, t)
            grad = torch.autograd.grad(total.sum(), xg, allow_unused=True)[0] if total.requires_grad else None
        if grad is None:
            grad = torch.zeros_like(x)
        return total.detach(), torch.nan_to_num(grad), parts


def make_denoiser(family: str, model, input, **kwargs) -> BoltzDenoiser:
    _check_family(family)
    cls = Boltz1Denoiser if family == "boltz1" else Boltz2Denoiser
    return cls(model, input, **kwargs)


def unmatched_atoms(layout: AtomLayout, other: AtomLayout) -> tuple[list, list]:
    """Atoms matched by (chain, residue number, atom name): (keys of ``layout`` missing from ``other``, keys of
    ``other`` missing from ``layout``) -- for the run log and metrics."""
    a, b = set(layout.keys()), set(other.keys())
    return [k for k in layout.keys() if k not in b], [k for k in other.keys() if k not in a]

"""Protenix (ByteDance's AlphaFold-3 reproduction, the ``protenix`` package pinned to 2.0.0) behind the denoising
interface.

Protenix's wheel pins torch, numpy, gemmi and CUDA-only packages that conflict with Boltz; its code runs on CPU with
ours, so it is installed without its pins by ``scripts/install_protenix.sh`` (extra ``.[protenix]`` + ``--no-deps``).
Nothing here imports Protenix until a predictor is built, so the rest of the project never needs it.

Everything is done offline, with Protenix's own featurizer and modules called directly (not through its runner,
which downloads weights and data):

    input (sequences or a structure file) -> Protenix's sample dict (one ``proteinChain`` entity per distinct
    sequence, our chain ids) -> SampleDictToFeatures (CCD atom arrays, tokenizer, featurizer) -> MSA features (single
    sequence, or a local .a3m) + empty template features -> relative positions and atom-window pair features
    -> trunk once under no_grad: ``get_pairformer_output`` (N_cycle passes of templates, MSA module, pairformer), then
       the diffusion module's two input-only caches (pair conditioning, atom-encoder pair features)
    -> denoise(x, sigma) = ``DiffusionModule.forward`` (EDM preconditioning included) on that conditioning.

Switches made for CPU: ``LAYERNORM_TYPE=torch`` before Protenix is imported (its default JIT-compiles a CUDA layer
norm at import) and the torch triangle multiplication/attention (the defaults need cuequivariance).  ESM models are
refused (they need the 3B-parameter ESM weights); templates are off.

Components: Protenix's featurizer reads ``components.cif`` and its RDKit pickle ``components.cif.rdkit_mol.pkl``
(normally ``$PROTENIX_ROOT_DIR/common``).  ``ensure_components`` writes the standard amino acids from the copy of the
PDB's CCD that biotite ships and runs Protenix's own per-component builder (``scripts/gen_ccd_cache.py`` of its
wheel) on them, downloads off, with a seeded ETKDG conformer so that the cache is reproducible.  ``cache_dir`` may
instead be a Protenix ``common/`` folder holding the full CCD; it is then used as it is.

Atoms: Protenix models the heavy atoms of each residue's CCD component minus the atoms that leave on peptide-bond
formation, so every chain's C-terminal residue keeps its OXT; the layout says so and atoms are matched to a structure
file by (chain, residue number, atom name).  Protenix pads atoms into 32-atom query windows inside its network and
masks the pads itself: at this interface there is no padding, ``denoise`` takes exactly the layout's atoms.

Sampling: Protenix centres, rotates and translates the structure at random every step (AF3 Alg. 19) and does not
align x_hat onto x0_hat.  ``needs_augmentation`` is therefore True; ``needs_alignment`` is True because its outputs
live in a random frame that guidance must superpose onto the input structure (``sampler.align=false`` then
reproduces Protenix's own sampler step for step).  Protenix's ``InferenceNoiseScheduler`` spaces N steps at i/N
(i < N) followed by 0, where AF3/Boltz (and ``guidance.sampler.karras_sigmas``) use i/(N-1): ``protenix_schedule``
with ``n_steps`` moves sigma_min so that our plan hits Protenix's own noise levels exactly.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from predictors.base import AtomLayout, NoiseSchedule
from predictors.boltz import resolve_input, resolve_msa_paths, unmatched_atoms

__all__ = [
    "DEFAULT_MODEL",
    "PROTENIX_VERSION",
    "TINY_ARCH",
    "ProtenixDenoiser",
    "ensure_components",
    "load_protenix",
    "protenix_configs",
    "protenix_schedule",
    "save_checkpoint",
    "tiny_model",
    "unmatched_atoms",
]

log = logging.getLogger(__name__)

PROTENIX_VERSION = "2.0.0"  # the version scripts/install_protenix.sh installs and this module was written against
DEFAULT_MODEL = "protenix_base_default_v1.0.0"
INSTALL_HINT = ("Protenix is not installed: run `bash scripts/install_protenix.sh` in this environment (it installs "
                f"protenix=={PROTENIX_VERSION} beside Boltz without its torch/numpy/gemmi pins)")
# The standard amino acids (plus UNK) that the component cache holds: inputs are checked to be standard residues.
AMINO_ACIDS = ("ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET", "PHE",
               "PRO", "SER", "THR", "TRP", "TYR", "VAL", "UNK")
COMPONENTS_CIF = "components.cif"  # Protenix's file names under $PROTENIX_ROOT_DIR/common
COMPONENTS_PKL = "components.cif.rdkit_mol.pkl"
COMPONENTS_MARKER = "ensemble_guide_components.json"  # written next to a cache this module built
CONFORMER_SEED = 0  # ETKDG seed for the reference conformers of the component cache


# Every Protenix module this file uses, imported together once (see _protenix).
_MODULES = ("configs.configs_base", "configs.configs_data", "configs.configs_inference", "configs.configs_model_type",
            "protenix.config.config", "protenix.model.protenix", "protenix.data.core.ccd",
            "protenix.data.inference.json_to_feature", "protenix.data.msa.msa_featurizer", "protenix.data.utils",
            "protenix.utils.torch_utils", "scripts.gen_ccd_cache")


def _protenix():
    """Import Protenix for CPU use (LAYERNORM_TYPE=torch unless the caller chose otherwise).

    Protenix's modules call its ``get_logger`` at import, which sets the *root* logger to INFO and replaces the
    formatter of its first handler (Hydra's run.log / console handlers in an ensemble-guide run): everything is
    imported here at once and the root logger restored afterwards; Protenix's own INFO chatter is silenced."""
    import importlib
    import sys

    if all(name in sys.modules for name in _MODULES):
        return sys.modules["protenix"]
    os.environ.setdefault("LAYERNORM_TYPE", "torch")
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), [(h, h.formatter, list(h.filters)) for h in root.handlers])
    try:
        for name in _MODULES:
            importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from exc
    finally:
        level, handlers, formats = saved
        root.setLevel(level)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        for h, fmt, filters in formats:
            h.setFormatter(fmt)
            h.filters = filters
        logging.getLogger("protenix").setLevel(logging.WARNING)
    return sys.modules["protenix"]


@contextlib.contextmanager
def _quiet():
    """Protenix prints from its constructors ("train scheduler 16.0", ...): keep that out of the user's stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed Python's and NumPy's global generators (Protenix's featurizer draws from both: random reference-conformer
    rotations, leaving-group choice) and restore their states afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


# ---------------------------------------------------------------------------------------------------------------------
# Configurations, schedules and checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def _deep_update(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def protenix_configs(model_name: str = DEFAULT_MODEL, arch: dict | None = None):
    """Protenix's configuration for ``model_name`` exactly as its inference runner composes it (base + data +
    inference configs, then the model type's specifics), with the torch triangle kernels, and ``arch`` (a nested
    dict of overrides, e.g. smaller widths for tiny test models) merged last."""
    _protenix()
    from configs.configs_base import configs as configs_base
    from configs.configs_data import data_configs
    from configs.configs_inference import inference_configs
    from configs.configs_model_type import model_configs
    from protenix.config.config import parse_configs

    if model_name not in model_configs:
        raise ValueError(f"unknown Protenix model {model_name!r}; use one of {sorted(model_configs)}")
    base = copy.deepcopy({**configs_base, "data": data_configs, **inference_configs})
    _deep_update(base, copy.deepcopy(model_configs[model_name]))
    _deep_update(base, {"triangle_multiplicative": "torch", "triangle_attention": "torch", "use_template": False})
    if arch:
        _deep_update(base, copy.deepcopy(dict(arch)))
    configs = parse_configs(base, fill_required_with_null=True)
    if configs.esm.enable:
        raise ValueError(f"Protenix model {model_name} needs ESM embeddings (the 3B-parameter ESM-2 weights), which "
                         "this predictor does not support; use a model without ESM, e.g. " + DEFAULT_MODEL)
    return configs


def protenix_schedule(configs=None, n_steps: int | None = None) -> NoiseSchedule:
    """The sampling parameters of Protenix's inference (``inference_noise_scheduler`` and ``sample_diffusion`` of
    its config; the mini/tiny models sample without churn).

    With ``n_steps``, sigma_min is moved so that ``guidance.sampler.plan(schedule, n_steps)`` gives exactly the noise
    levels of Protenix's ``InferenceNoiseScheduler(N_step=n_steps)``: Protenix spaces its levels at i/N (i < N),
    then 0, so its last non-zero level is the Karras ramp at (N-1)/N, which becomes our sigma_min."""
    if configs is None:
        configs = protenix_configs()
    ns, sd = configs.inference_noise_scheduler, configs.sample_diffusion
    smax, smin, rho = float(ns.s_max), float(ns.s_min), float(ns.rho)
    if n_steps is not None:
        if n_steps < 2:
            raise ValueError(f"the sampler needs at least 2 steps, got {n_steps}")
        ramp = smax ** (1 / rho) + (n_steps - 1) / n_steps * (smin ** (1 / rho) - smax ** (1 / rho))
        smin = ramp**rho
    return NoiseSchedule(sigma_data=float(ns.sigma_data), sigma_max=smax, sigma_min=smin, rho=rho,
                         gamma_0=float(sd.gamma0), gamma_min=float(sd.gamma_min),
                         noise_scale=float(sd.noise_scale_lambda), step_scale=float(sd.step_scale_eta))


def _build(configs):
    _protenix()
    from protenix.model.protenix import Protenix

    with _quiet():
        model = Protenix(configs)
    return model.eval()


# Toy widths/depths for tiny randomly initialised models (tests, benchmarks, trying the plumbing without weights).
# Protenix requires c_s_inputs = c_token + 65 (token embedding + restype 32 + profile 32 + deletion mean 1).
TINY_ARCH = {
    "c_s": 32, "c_z": 16, "c_token": 32, "c_s_inputs": 97, "c_atom": 16, "c_atompair": 8, "n_blocks": 2,
    "model": {
        "N_cycle": 2,
        "template_embedder": {"n_blocks": 0},
        "msa_module": {"n_blocks": 1, "c_m": 8},
        "pairformer": {"n_heads": 2},
        "diffusion_module": {"c_token": 32, "atom_encoder": {"n_blocks": 1, "n_heads": 2},
                             "transformer": {"n_blocks": 1, "n_heads": 2},
                             "atom_decoder": {"n_blocks": 1, "n_heads": 2}},
        "confidence_head": {"n_blocks": 1},
    },
}


def tiny_model(seed: int = 0, arch: dict | None = None):
    """A randomly initialised Protenix with the released architecture at toy width/depth (``TINY_ARCH``; no weights
    needed).  Its checkpoint (``save_checkpoint``) loads through ``load_protenix(path, arch=TINY_ARCH)``."""
    configs = protenix_configs(DEFAULT_MODEL, TINY_ARCH if arch is None else arch)
    torch.manual_seed(seed)
    model = _build(configs)
    with torch.no_grad():  # Protenix zero-initialises some output layers; give them small values so the toy model
        for name, p in model.named_parameters():  # is not the identity
            if p.ndim > 1 and not p.abs().any():
                p.normal_(0.0, 0.02)
    return model


def save_checkpoint(model, path) -> Path:
    """Save ``model`` in Protenix's checkpoint format (``{"model": state_dict}``, as its trainer writes it)."""
    path = Path(path)
    torch.save({"model": model.state_dict()}, path)
    return path


def load_protenix(checkpoint, *, model_name: str | None = None, arch: dict | None = None, device="cpu"):
    """Load a Protenix checkpoint as Protenix's inference runner does (its ``{"model": state_dict}`` file, DDP
    ``module.`` prefixes removed, strict), in eval mode on ``device``.

    ``model_name``: the architecture (a key of Protenix's ``configs_model_type.model_configs``); None takes it from
    the file name when that is a released model's name (``protenix_base_default_v1.0.0.pt``), else the default
    base model.  ``arch``: nested config overrides for non-released architectures (e.g. ``TINY_ARCH``)."""
    _protenix()
    from configs.configs_model_type import model_configs

    path = Path(checkpoint).expanduser()
    if model_name is None:
        model_name = path.stem if path.stem in model_configs else DEFAULT_MODEL
    if not path.is_file():
        raise FileNotFoundError(
            f"Protenix checkpoint not found: {path}. Get the official weights with Protenix's CLI (`protenix pred "
            f"...` downloads {model_name}.pt to $PROTENIX_ROOT_DIR/checkpoint) or from the Protenix release "
            "(github.com/bytedance/Protenix); then set predictor.checkpoint to that file."
        )
    configs = protenix_configs(model_name, arch)
    try:
        from argparse import Namespace

        with torch.serialization.safe_globals([Namespace]):  # Protenix's files may hold its argparse configs
            ckpt = torch.load(str(path), map_location=str(device), weights_only=True)
        state = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model = _build(configs)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, AttributeError, pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(
            f"{path} could not be loaded as a Protenix {model_name} checkpoint ({type(exc).__name__}: "
            f"{str(exc)[:300]}). Is it an official Protenix checkpoint, and predictor.model_name its model?"
        ) from exc
    return model.eval().to(device)


# ---------------------------------------------------------------------------------------------------------------------
# Component cache (offline, from biotite's CCD)
# ---------------------------------------------------------------------------------------------------------------------


def _write_components_cif(path: Path, codes) -> None:
    """``components.cif`` holding ``codes`` (chem_comp, chem_comp_atom, chem_comp_bond) from biotite's CCD."""
    import biotite.structure.info as info
    import biotite.structure.io.pdbx as pdbx

    ccd = info.get_ccd()
    codes = list(codes)
    columns: dict[str, tuple[np.ndarray, dict]] = {}
    for category in ("chem_comp", "chem_comp_atom", "chem_comp_bond"):
        cat = ccd[category]
        ids = cat["id" if category == "chem_comp" else "comp_id"].as_array()
        rows = np.flatnonzero(np.isin(ids, codes))
        data = {}
        for name in cat.keys():
            col = cat[name]
            values = col.as_array()[rows].astype(str)
            mask = None if col.mask is None else col.mask.array[rows]
            data[name] = (values, mask)
        columns[category] = (ids[rows], data)
    missing = [c for c in codes if c not in set(columns["chem_comp"][0].tolist())]
    if missing:
        raise ValueError(f"components {missing} are not in biotite's CCD")
    out = pdbx.CIFFile()
    for code in codes:
        block = {}
        for category, (ids, data) in columns.items():
            sel = ids == code
            block[category] = pdbx.CIFCategory({
                name: pdbx.CIFColumn(pdbx.CIFData(values[sel]), None if mask is None else pdbx.CIFData(mask[sel]))
                for name, (values, mask) in data.items()})
        out[code] = pdbx.CIFBlock(block)
    out.write(str(path))


@contextlib.contextmanager
def _seeded_etkdg(seed: int):
    """Protenix's cache builder embeds each component with ``AllChem.ETKDGv3()`` (unseeded); seed it."""
    from rdkit.Chem import AllChem

    original = AllChem.ETKDGv3

    def seeded():
        params = original()
        params.randomSeed = seed
        return params

    AllChem.ETKDGv3 = seeded
    try:
        yield
    finally:
        AllChem.ETKDGv3 = original


def ensure_components(cache_dir, codes=AMINO_ACIDS) -> Path:
    """The folder holding Protenix's component files for ``codes``, built offline on first use.

    A folder with ``components.cif`` and ``components.cif.rdkit_mol.pkl`` not built here (e.g. a Protenix
    ``$PROTENIX_ROOT_DIR/common`` with the full CCD) is used as it is.  Otherwise the components are written from
    biotite's copy of the CCD and their RDKit molecules and reference conformers made by Protenix's own builder
    (``scripts.gen_ccd_cache._get_component_rdkit_mol_processing``, one component at a time, no download, no worker
    processes)."""
    _protenix()
    cache = Path(cache_dir).expanduser()
    cif, pkl, marker = cache / COMPONENTS_CIF, cache / COMPONENTS_PKL, cache / COMPONENTS_MARKER
    codes = sorted(set(codes))
    if cif.is_file() and pkl.is_file():
        if not marker.is_file():
            return cache  # somebody else's (Protenix's) cache
        built = json.loads(marker.read_text())
        if set(codes) <= set(built.get("codes", [])) and built.get("protenix") == PROTENIX_VERSION:
            return cache
        codes = sorted(set(codes) | set(built.get("codes", [])))
    from scripts.gen_ccd_cache import _get_component_rdkit_mol_processing, gemmi_load_ccd_cif

    cache.mkdir(parents=True, exist_ok=True)
    tmp_cif = cache / f".{COMPONENTS_CIF}.{os.getpid()}.tmp"
    tmp_pkl = cache / f".{COMPONENTS_PKL}.{os.getpid()}.tmp"
    try:
        _write_components_cif(tmp_cif, codes)
        mols = {}
        with _seeded_etkdg(CONFORMER_SEED):
            for code in codes:
                mol = _get_component_rdkit_mol_processing((code, tmp_cif))
                if mol is None:
                    raise ValueError(f"Protenix's component builder could not read {code}")
                mols[mol.name] = mol
        with open(tmp_pkl, "wb") as fh:
            pickle.dump(mols, fh)
        os.replace(tmp_cif, cif)
        os.replace(tmp_pkl, pkl)
    finally:
        gemmi_load_ccd_cif.cache_clear()
        tmp_cif.unlink(missing_ok=True)
        tmp_pkl.unlink(missing_ok=True)
    marker.write_text(json.dumps({"codes": codes, "protenix": PROTENIX_VERSION, "source": "biotite CCD",
                                  "conformer_seed": CONFORMER_SEED}))
    log.info("protenix: component cache for %d components written to %s", len(codes), cache)
    return cache


def _use_components(cache: Path) -> None:
    """Point Protenix's CCD module at ``cache`` (its paths are fixed at import from $PROTENIX_ROOT_DIR) and drop
    what it cached from another folder."""
    from protenix.data.core import ccd

    cif, pkl = str(cache / COMPONENTS_CIF), cache / COMPONENTS_PKL
    if str(ccd.COMPONENTS_FILE) == cif and Path(ccd.RKDIT_MOL_PKL) == pkl:
        return
    ccd.COMPONENTS_FILE = cif
    ccd.RKDIT_MOL_PKL = pkl
    ccd._ccd_rdkit_mols = {}
    for fn in (ccd.biotite_load_ccd_cif, ccd.get_component_atom_array, ccd.get_one_letter_code, ccd.get_mol_type,
               ccd.get_ccd_ref_info):
        fn.cache_clear()


# ---------------------------------------------------------------------------------------------------------------------
# The denoiser
# ---------------------------------------------------------------------------------------------------------------------


class ProtenixDenoiser:
    """A Protenix model conditioned once on one input, answering ``denoise(x [B, N, 3], sigma [B]) -> x0_hat``.

    ``model``: a Protenix module (``load_protenix`` or ``tiny_model``).  ``input``: {chain: protein sequence} or a
    structure file path (PDB/mmCIF; protein chains).  ``cache_dir``: the component cache (``ensure_components``).
    ``msa``: "none" (single sequence), a path to an .a3m used for every chain, or {chain: path} (Protenix reads it as
    the chain's unpaired MSA).  ``n_cycle``: trunk passes (None: the model's own, 10 for the released base models).
    ``n_steps``: the number of sampling steps, to match Protenix's own noise levels (see ``protenix_schedule``);
    None keeps the AF3 discretisation.  ``seed`` seeds the featurizer (random reference-conformer rotations).
    """

    needs_augmentation = True
    needs_alignment = True

    def __init__(self, model, input, *, cache_dir="~/.cache/ensemble-guide/protenix", msa="none",
                 n_cycle: int | None = None, n_steps: int | None = None, seed: int = 0, dtype=torch.float32):
        if dtype != torch.float32:
            raise ValueError(f"Protenix predictors run in float32 only, got {dtype}")
        self.model = model.eval()
        self.configs = model.configs
        self.schedule = protenix_schedule(self.configs, n_steps)
        self.dtype = dtype
        self.device = next(model.parameters()).device
        seqs, numbers, self.source = resolve_input(input)
        self.sequences = seqs
        self.cache_dir = ensure_components(cache_dir)
        _use_components(self.cache_dir)
        self.n_cycle = int(self.configs.model.N_cycle if n_cycle is None else n_cycle)
        if self.n_cycle < 1:
            raise ValueError(f"n_cycle must be >= 1, got {self.n_cycle}")
        self.feats, self.atom_array = self._featurize(seqs, msa, seed)
        self.layout = self._layout(numbers)
        self.trunk_calls = 0
        with torch.no_grad():
            self.condition = self._trunk()

    # -- featurization -----------------------------------------------------------------------------------------------

    def _msa_paths(self, seqs, msa) -> dict[str, str]:
        if isinstance(msa, dict):  # Protenix would key an MSA of an unknown chain to no entity: say so
            unknown = [str(c) for c in msa if str(c) not in seqs]
            if unknown:
                raise ValueError(f"MSA given for chain {unknown[0]}, which is not among the input's chains {list(seqs)}")
        return resolve_msa_paths(seqs, msa)

    def _sample(self, seqs, msa_paths) -> dict:
        """Protenix's JSON input: one proteinChain entity per distinct sequence (chains with identical sequences share
        an entity, as Protenix's own JSON makers group them), named with our chain ids."""
        entities: dict[str, list[str]] = {}
        for chain, seq in seqs.items():
            entities.setdefault(seq, []).append(chain)
        sequences = []
        for seq, chains in entities.items():
            entry = {"sequence": seq, "count": len(chains), "id": chains}
            paths = {msa_paths[c] for c in chains if c in msa_paths}
            if len(paths) > 1:
                raise ValueError(f"chains {chains} share a sequence (one Protenix entity) but were given different "
                                 f"MSA files {sorted(paths)}")
            if paths:
                entry["unpairedMsaPath"] = paths.pop()
            sequences.append({"proteinChain": entry})
        return {"name": "ensemble_guide_input", "sequences": sequences}

    def _featurize(self, seqs, msa, seed):
        from protenix.data.inference.json_to_feature import SampleDictToFeatures
        from protenix.data.msa.msa_featurizer import InferenceMSAFeaturizer
        from protenix.data.utils import data_type_transform, make_dummy_feature
        from protenix.model.protenix import update_input_feature_dict
        from protenix.utils.torch_utils import dict_to_tensor, to_device

        msa_paths = self._msa_paths(seqs, msa)
        sample = self._sample(seqs, msa_paths)
        with _seeded(seed):  # as InferenceDataset.process_one, without its ESM and template branches
            s2f = SampleDictToFeatures(sample)
            feats, atom_array, _ = s2f.get_feature_dict()
            feats["distogram_rep_atom_mask"] = torch.Tensor(atom_array.distogram_rep_atom_mask).long()
            msa_feats = {}
            if msa_paths:
                msa_feats = InferenceMSAFeaturizer.make_msa_feature(
                    bioassembly=sample["sequences"], atom_array=atom_array, msa_pair_as_unpair=True,
                    use_rna_msa=False)
            dummy = ["template"]
            if msa_feats:
                feats.update(dict_to_tensor(msa_feats))
            else:
                dummy.append("msa")
            feats = make_dummy_feature(features_dict=feats, dummy_feats=dummy)
            feats = data_type_transform(feat_or_label_dict=feats)
        self.msa_depth = int(feats["msa"].shape[0])  # 1 = single sequence
        feats = to_device(feats, self.device)
        feats = self.model.relative_position_encoding.generate_relp(feats)
        feats = update_input_feature_dict(feats)  # atom-window pair geometry of the reference conformers
        return feats, atom_array

    def _layout(self, numbers) -> AtomLayout:
        arr = self.atom_array
        chain_id = arr.chain_id.astype(str)
        res_seq = np.array([numbers[c][int(r) - 1] for c, r in zip(chain_id, arr.res_id)])
        return AtomLayout(chain_id, res_seq, arr.res_name.astype(str), arr.atom_name.astype(str),
                          arr.element.astype(str))

    # -- conditioning ------------------------------------------------------------------------------------------------

    def _trunk(self) -> dict:
        """As Protenix's inference loop: the pairformer output, then the diffusion module's caches of the inputs
        that do not depend on x or sigma (``enable_diffusion_shared_vars_cache``)."""
        m, feats = self.model, self.feats
        n_token = int(feats["residue_index"].shape[-1])
        setting = self.configs.infer_setting
        chunk = m._get_dynamic_chunk_size(n_token) if setting.get("dynamic_chunk_size") else setting.chunk_size
        hook = m.pairformer_stack.register_forward_hook(lambda *_: setattr(self, "trunk_calls", self.trunk_calls + 1))
        try:
            s_inputs, s, z = m.get_pairformer_output(feats, N_cycle=self.n_cycle, inplace_safe=True, chunk_size=chunk)
        finally:
            hook.remove()
        dm = m.diffusion_module
        pair_z = dm.diffusion_conditioning.prepare_cache(feats["relp"], z, False)
        p_lm, c_l = dm.atom_attention_encoder.prepare_cache(
            ref_pos=feats["ref_pos"], ref_charge=feats["ref_charge"], ref_mask=feats["ref_mask"],
            ref_element=feats["ref_element"], ref_atom_name_chars=feats["ref_atom_name_chars"],
            atom_to_token_idx=feats["atom_to_token_idx"], d_lm=feats["d_lm"], v_lm=feats["v_lm"],
            pad_info=feats["pad_info"], r_l=True, z=pair_z, inplace_safe=False)
        # as Protenix's inference loop: MSA and template features are not needed after the trunk; nor is the
        # [N_atom, N_atom] bond mask (its training loss only)
        drop = ("msa", "has_deletion", "deletion_value", "profile", "deletion_mean", "bond_mask")
        for key in [k for k in feats if k.startswith("template_") or k in drop]:
            del feats[key]
        return {"s_inputs": s_inputs.detach(), "s_trunk": s.detach(), "z_trunk": z.detach(),
                "pair_z": pair_z.detach(), "p_lm": None if p_lm is None else p_lm.detach(), "c_l": c_l.detach()}

    # -- denoising ---------------------------------------------------------------------------------------------------

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """x0_hat [B, N, 3] for x [B, N, 3] (layout order) and sigma [B] (or a scalar), in Angstrom."""
        n = len(self.layout)
        if x.ndim != 3 or x.shape[1:] != (n, 3):
            raise ValueError(f"x must have shape [B, {n}, 3] for this predictor's {n} atoms, got {tuple(x.shape)}")
        batch = x.shape[0]
        s = torch.as_tensor(sigma, dtype=self.dtype, device=self.device).reshape(-1)
        s = s.expand(batch) if s.numel() == 1 else s
        if s.numel() != batch:
            raise ValueError(f"sigma must be a scalar or have one entry per sample ({batch}), got {tuple(s.shape)}")
        c = self.condition
        out = self.model.diffusion_module(
            x_noisy=x.to(device=self.device, dtype=self.dtype), t_hat_noise_level=s, input_feature_dict=self.feats,
            s_inputs=c["s_inputs"], s_trunk=c["s_trunk"], z_trunk=None, pair_z=c["pair_z"], p_lm=c["p_lm"],
            c_l=c["c_l"], inplace_safe=False, chunk_size=None,
            enable_efficient_fusion=bool(self.model.enable_efficient_fusion))
        return out.to(device=x.device, dtype=x.dtype)

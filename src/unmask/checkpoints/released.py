"""MDLM's released checkpoint formats, read and written without their CUDA-only code.

Two layouts hold MDLM's ``DIT`` weights (Sahoo et al. 2024, ``models/dit.py`` of ``kuleshov-group/mdlm``), whose
key names this project's :class:`~unmask.models.dit.DiT` shares:

* the Hugging Face folder of ``kuleshov-group/mdlm-owt``: ``config.json`` (``model_type: "mdlm"``,
  ``hidden_dim``, ``n_blocks``, ``n_heads``, ``cond_dim``, ``model_length``, ``time_conditioning``,
  ``vocab_size``) and ``model.safetensors`` with keys ``backbone.<DIT key>``;
* the Lightning ``.ckpt``: ``state_dict`` with keys ``backbone.<DIT key>`` and the EMA as a list
  ``ema.shadow_params`` in ``backbone.parameters()`` order.

A ``.ckpt`` is a pickle in a zip archive. :func:`read_lightning_ckpt` first checks that the archive
has exactly ``torch.save``'s layout (:func:`unmask.files.check_torch_archive`: a TorchScript archive,
which ``torch.load`` would run, never reaches it), then unpickles it with :class:`RestrictedUnpickler`:
tensors, containers and dtypes are rebuilt; classes of the training stack (OmegaConf, Lightning,
NumPy, ...) become inert placeholders whose code never runs; any other global (``os.system``,
``builtins.eval``, ...) makes it refuse the file before anything is called.
"""

from __future__ import annotations

import _compat_pickle
import json
import os
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import RunConfig, config_from_dict
from ..files import check_torch_archive, member
from .checkpoint import CheckpointError, load_tensors

PREFIX = "backbone."


MDLM_HEAD_DIM = 64  # every MDLM config (tiny/small/medium) has 64-dimensional heads


MDLM_SCHEDULE_EPS = 1e-3  # training masks with probability (1 - 1e-3) t


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that references code the restricted loader will not run."""


def mdlm_parameter_names(n_blocks: int) -> list[str]:
    """DIT's ``parameters()`` order (the order of ``ema.shadow_params``); buffers excluded."""
    names = ["vocab_embed.embedding", "sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias",
             "sigma_map.mlp.2.weight", "sigma_map.mlp.2.bias"]
    for i in range(n_blocks):
        names += [f"blocks.{i}.{n}" for n in (
            "norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight", "mlp.0.weight", "mlp.0.bias",
            "mlp.2.weight", "mlp.2.bias", "adaLN_modulation.weight", "adaLN_modulation.bias")]
    names += ["output_layer.norm_final.weight", "output_layer.linear.weight", "output_layer.linear.bias",
              "output_layer.adaLN_modulation.weight", "output_layer.adaLN_modulation.bias"]
    return names


def n_blocks_of(weights: dict[str, torch.Tensor]) -> int:
    """The number of DIT blocks in ``weights`` (their ``blocks.<i>.`` indices must be 0..n-1)."""
    blocks = {int(k.split(".")[1]) for k in weights if k.startswith("blocks.")}
    if blocks != set(range(len(blocks))):
        raise CheckpointError(f"block indices {sorted(blocks)} are not 0..n-1")
    return len(blocks)


def run_config_for(hidden: int, n_blocks: int, heads: int, cond_dim: int, length: int, vocab_size: int,
                   time_conditioning: bool, dropout: float = 0.1) -> RunConfig:
    """The run config of a released MDLM model: GPT-2 tokens, wrapped rows of ``length`` with EOS
    between documents, log-linear schedule with MDLM's eps = 1e-3."""
    if hidden % heads:
        raise CheckpointError(f"hidden size {hidden} is not divisible by {heads} heads")
    return config_from_dict({
        "family": "mdlm",
        "model": dict(hidden=hidden, blocks=n_blocks, heads=heads, cond_dim=cond_dim, dropout=dropout,
                      length=length, time_conditioning=time_conditioning),
        "data": dict(dataset="hf", path="openwebtext", tokenizer="gpt2", length=length, layout="wrap",
                     insert_eos=True),
        "diffusion": dict(schedule="loglinear", schedule_eps=MDLM_SCHEDULE_EPS),
    })


def read_mdlm_hf(folder: Path, hf: dict, root: Path | None = None) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(run config, DIT weights) of a ``kuleshov-group/mdlm-owt``-style folder whose ``config.json``
    holds ``hf``; files must lie inside ``root`` (default: the folder)."""
    sizes = ("hidden_dim", "n_blocks", "n_heads", "cond_dim", "vocab_size")
    missing = [k for k in sizes if k not in hf]
    if missing:
        raise CheckpointError(f"{folder / 'config.json'} lacks {missing}: not an MDLM config")
    wrong = [k for k in sizes + ("model_length",) if k in hf and (type(hf[k]) is not int or hf[k] < 1)]
    if wrong or not isinstance(hf.get("dropout", 0.1), (int, float)):
        raise CheckpointError(f"{folder / 'config.json'}: {wrong or ['dropout']} must be positive integers "
                              f"(dropout a number)")
    path = member(folder, "model.safetensors", root)
    weights = strip_prefix(load_tensors(path), str(path))
    cfg = run_config_for(hf["hidden_dim"], hf["n_blocks"], hf["n_heads"], hf["cond_dim"],
                         hf.get("model_length", 1024), hf["vocab_size"], bool(hf.get("time_conditioning", False)),
                         hf.get("dropout", 0.1))
    check_shapes(weights, cfg, hf["vocab_size"], str(folder))
    return cfg, weights


def write_mdlm_hf(folder: Path, weights: dict[str, torch.Tensor], cfg: RunConfig, vocab_size: int) -> None:
    """The ``mdlm-owt`` layout, for MDLM's own code (``backbone=hf_dit``)."""
    m = cfg.model
    hf = {"architectures": ["MDLM"], "model_type": "mdlm",
          "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig",
                       "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
          "vocab_size": vocab_size, "model_length": m.length, "hidden_dim": m.hidden, "cond_dim": m.cond_dim,
          "n_blocks": m.blocks, "n_heads": m.heads, "dropout": m.dropout,
          "time_conditioning": m.time_conditioning, "return_dict": False, "torch_dtype": "float32"}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({PREFIX + k: v.detach().contiguous().cpu() for k, v in weights.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def strip_prefix(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` tensors of an MDLM checkpoint under their DIT names (prefix removed)."""
    out = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    if not out:
        raise CheckpointError(f"{source} holds no '{PREFIX}*' tensors: not an MDLM checkpoint")
    return out


def check_shapes(weights: dict[str, torch.Tensor], cfg: RunConfig, vocab_size: int, source: str) -> None:
    """Check that the vocabulary embedding of ``weights`` is (``vocab_size``, ``cfg.model.hidden``)."""
    embedding = weights.get("vocab_embed.embedding")
    if embedding is None:
        raise CheckpointError(f"{source} lacks vocab_embed.embedding")
    if tuple(embedding.shape) != (vocab_size, cfg.model.hidden):
        raise CheckpointError(f"{source}: vocab_embed.embedding has shape {tuple(embedding.shape)}, the config "
                              f"says ({vocab_size}, {cfg.model.hidden})")


class Inert:
    """Stands in for a class of the training stack; records what the pickle gave it, runs nothing."""

    origin = "?"

    def __new__(cls, *args, **kwargs):
        """A bare instance; the pickle's arguments reach no code of the class it stands for."""
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, {}

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # dict subclasses (Lightning's AttributeDict)
        self.items[key] = value

    def append(self, value):  # list subclasses
        """Record ``value`` as the next item (what a pickled list subclass calls)."""
        self.items[len(self.items)] = value

    def extend(self, values):
        """Record each of ``values`` as :meth:`append` does."""
        for v in values:
            self.append(v)

    def __repr__(self):
        return f"<inert {self.origin}>"


# Modules whose classes hold a checkpoint's metadata (configs, loop state, callbacks): read as Inert.
INERT_MODULES = ("omegaconf", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "hydra",
                 "numpy", "pathlib", "typing", "enum", "datetime", "transformers", "tokenizers")


# Globals that are rebuilt for real: tensor and container reconstruction only.
ALLOWED = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("collections", "defaultdict"): __import__("collections").defaultdict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("_codecs", "encode"): __import__("_codecs").encode,  # bytes in protocol-2 pickles
}


# Plain data types: referenced as values in config metadata, harmless when called (bytes and
# bytearray only with contents: ``bytes(10**12)`` would allocate a terabyte).
ALLOWED.update({("builtins", t.__name__): t for t in (set, frozenset, slice, complex, dict, list, tuple, str, int,
                                                       float, bool, object)})


def _bytes_of(kind: type):
    def build(*args):
        if args and isinstance(args[0], int):
            raise UnsafeCheckpointError(f"refusing {kind.__name__}({args[0]}): a size, not contents")
        return kind(*args)

    build.__qualname__ = kind.__name__
    return build


ALLOWED.update({("builtins", "bytes"): _bytes_of(bytes), ("builtins", "bytearray"): _bytes_of(bytearray)})


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in ALLOWED.values() or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafeCheckpointError(f"refusing to rebuild a tensor of type {new_type!r} with {func!r}")
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _reconstructor(cls, base, state):
    if isinstance(cls, type) and issubclass(cls, Inert):
        obj = cls()
        obj.state = state
        return obj
    raise UnsafeCheckpointError(f"refusing copyreg reconstruction of {cls!r}")


ALLOWED[("torch._tensor", "_rebuild_from_type_v2")] = _rebuild_from_type_v2


ALLOWED[("copyreg", "_reconstructor")] = _reconstructor


class RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` is the only way a pickle reaches code: allow-list it."""

    def find_class(self, module: str, name: str):
        """The allow-listed global for ``module.name``, an :class:`Inert` placeholder for a class of the training
        stack, or an :class:`UnsafeCheckpointError` for anything else."""
        # protocol-2 pickles (torch.save's default) name builtins the Python 2 way ('__builtin__')
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in INERT_MODULES:
            return type(name, (Inert,), {"origin": f"{module}.{name}"})
        raise UnsafeCheckpointError(
            f"refusing to load: the file references '{module}.{name}', which this loader does not run "
            f"(unpickling it could execute code from the file); only tensors, containers and inert "
            f"metadata are read")


restricted_pickle = types.SimpleNamespace(Unpickler=RestrictedUnpickler, __name__="unmask_restricted_pickle",
                                          load=None)


def read_lightning_ckpt(path: Path) -> dict[str, Any]:
    """The top-level dict of a Lightning checkpoint, unpickled with :class:`RestrictedUnpickler`."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a torch zip checkpoint (the legacy pre-1.6 format is not read)")
    check_torch_archive(path)
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{path}: {exc}") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint {path}: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return obj


def plain(obj: Any, depth: int = 0) -> Any:
    """Inert placeholders (OmegaConf containers and nodes, dict subclasses) as plain Python values."""
    if depth > 50:
        return None
    if isinstance(obj, Inert):
        if isinstance(obj.state, dict):
            for key in ("_content", "_val"):
                if key in obj.state:
                    return plain(obj.state[key], depth + 1)
            if "__dict__" in obj.state:
                return plain(obj.state["__dict__"], depth + 1)
            return {k: plain(v, depth + 1) for k, v in obj.state.items() if not str(k).startswith("_")}
        if isinstance(obj.state, tuple) and obj.state and isinstance(obj.state[0], dict):
            return plain(obj.state[0], depth + 1)
        if obj.items:
            return {k: plain(v, depth + 1) for k, v in obj.items.items()}
        return obj.args[0] if len(obj.args) == 1 else None
    if isinstance(obj, dict):
        return {k: plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, depth + 1) for v in obj]
    return obj


def _find(tree: Any, key: str) -> Any:
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for v in tree.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def read_mdlm_ckpt(path: Path, heads: int | None = None, length: int | None = None,
                   time_conditioning: bool | None = None) -> tuple[RunConfig, dict[str, torch.Tensor],
                                                                   dict[str, torch.Tensor] | None, int]:
    """(run config, raw weights, EMA weights or None, step) of MDLM's Lightning ``.ckpt``.

    The shape comes from the tensors; heads, length and time conditioning from the checkpoint's
    ``hyper_parameters.config.model`` when readable, else ``hidden / 64`` heads, length 1024 and no
    time conditioning (MDLM's OWT settings) unless given.
    """
    obj = read_lightning_ckpt(path)
    state = obj["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state_dict' is not a dict")
    weights = strip_prefix(state, str(path))
    hidden = weights["vocab_embed.embedding"].shape[1]
    vocab_size = weights["vocab_embed.embedding"].shape[0]
    n_blocks = n_blocks_of(weights)
    cond_dim = weights["sigma_map.mlp.0.weight"].shape[0]
    hyper = plain(obj.get("hyper_parameters", {}))
    model_hp = _find(hyper, "model") or {}
    model_hp = model_hp if isinstance(model_hp, dict) else {}
    heads = heads or model_hp.get("n_heads") or hidden // MDLM_HEAD_DIM
    length = length or model_hp.get("length") or 1024
    if time_conditioning is None:
        time_conditioning = bool(_find(hyper, "time_conditioning") or False)
    cfg = run_config_for(hidden, n_blocks, int(heads), cond_dim, int(length), vocab_size, time_conditioning,
                         float(model_hp.get("dropout", 0.1)))
    ema = None
    ema_state = obj.get("ema")
    if isinstance(ema_state, dict) and ema_state.get("shadow_params") is not None:
        shadow = list(ema_state["shadow_params"])
        names = mdlm_parameter_names(n_blocks)
        if len(shadow) != len(names):
            raise CheckpointError(f"{path}: ema.shadow_params has {len(shadow)} tensors, the model has "
                                  f"{len(names)} parameters")
        ema = dict(zip(names, shadow))
        for name in names:
            if tuple(ema[name].shape) != tuple(weights[name].shape):
                raise CheckpointError(f"{path}: EMA tensor {name} has shape {tuple(ema[name].shape)}, the weight "
                                      f"{tuple(weights[name].shape)}")
        ema.update({k: v for k, v in weights.items() if k not in ema})  # buffers (rotary inv_freq)
    step = int(obj.get("global_step", 0) or 0)
    return cfg, weights, ema, step


def write_mdlm_ckpt(path: Path, weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                    cfg: RunConfig, step: int = 0, ema_decay: float = 0.9999) -> None:
    """A Lightning-layout ``.ckpt`` (plain dicts and tensors only, readable with ``weights_only``)."""
    m = cfg.model
    obj = {"epoch": 0, "global_step": step, "pytorch-lightning_version": "2.2.1",
           "state_dict": {PREFIX + k: v.detach().cpu() for k, v in weights.items()},
           "hyper_parameters": {"config": {"model": {"hidden_size": m.hidden, "cond_dim": m.cond_dim,
                                                     "length": m.length, "n_blocks": m.blocks,
                                                     "n_heads": m.heads, "dropout": m.dropout},
                                           "time_conditioning": m.time_conditioning}}}
    if ema is not None:
        names = mdlm_parameter_names(m.blocks)
        obj["ema"] = {"decay": ema_decay, "num_updates": step,
                      "shadow_params": [ema[n].detach().cpu() for n in names]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)

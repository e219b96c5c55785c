"""Find, download, verify and load SegVol weights: one place for all of it.

Accepted sources:
  * a Hugging Face snapshot directory of BAAI/SegVol (``model.safetensors`` or
    ``pytorch_model.bin``, keys prefixed ``model.``; tokenizer files beside it);
  * ``pytorch_model.bin`` / ``model.safetensors`` themselves;
  * ``SegVol_v1.pth`` of the GitHub release (``ckpt["model"]``, keys prefixed ``module.``).
Files are read as tensors only (``torch.load(weights_only=True)`` or safetensors): a
pickle that asks for code is refused. A model config other than the official one is
read from ``segvol_config.json`` beside the weights (written by ``save_official``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path

import torch

from segvol.model import CONFIGS, SegVol, SegVolConfig
from segvol.model.text_encoder import load_tokenizer

log = logging.getLogger(__name__)

HF_REPO = "BAAI/SegVol"
HF_FILES = (
    "pytorch_model.bin",
    "config.json",
    "tokenizer.json",
    "vocab.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
OFFICIAL_SHA256 = {"pytorch_model.bin": "500f2758a8f989339b2b2baf09a819169bc87549795193d3cfe505726ac0b399"}
OFFICIAL_SIZE = {"pytorch_model.bin": 723_726_667}
CONFIG_FILE = "segvol_config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json")

_CLIP_OFFICIAL = "text_encoder.clip_text_model.text_model."
_CLIP_OURS = "text_encoder.clip_text_model."
_POSITION_IDS = _CLIP_OFFICIAL + "embeddings.position_ids"
_PREFIXES = ("model.", "module.")


class WeightsError(RuntimeError):
    """Weights missing, unreadable or not a SegVol checkpoint; the message says which file and why."""


# ----------------------------------------------------------------------------- key layouts
def from_official(state: dict[str, torch.Tensor], source: str = "state_dict") -> OrderedDict:
    """Official layout (any of the released prefixes, transformers-4 CLIP keys) -> our module's keys."""
    prefix = next((p for p in _PREFIXES if state and all(k.startswith(p) for k in state)), "")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, tensor in state.items():
        key = key[len(prefix) :]
        if key == _POSITION_IDS:
            if not torch.equal(tensor.reshape(-1), torch.arange(tensor.numel(), dtype=tensor.dtype)):
                raise WeightsError(f"{source}: {key} is not arange({tensor.numel()})")
            continue
        if key.startswith(_CLIP_OFFICIAL):
            key = _CLIP_OURS + key[len(_CLIP_OFFICIAL) :]
        out[key] = tensor
    return out


def to_official(state: dict[str, torch.Tensor], prefix: str = "model.") -> OrderedDict:
    """Our module's keys -> the official file layout (the inverse of ``from_official``)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    n_pos = None
    for key, tensor in state.items():
        if key.startswith(_CLIP_OURS):
            key = _CLIP_OFFICIAL + key[len(_CLIP_OURS) :]
            if key.endswith("embeddings.position_embedding.weight"):
                n_pos = tensor.shape[0]
        out[prefix + key] = tensor
    if n_pos is not None:
        out[prefix + _POSITION_IDS] = torch.arange(n_pos, dtype=torch.int64)[None]
    return out


# ----------------------------------------------------------------------------- files
def resolve(path: str | Path) -> Path:
    """The weights file for a path that is a file or a snapshot directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "SegVol_v1.pth"):
            if (p / name).is_file():
                return p / name
        raise WeightsError(f"{p}: no model.safetensors, pytorch_model.bin or SegVol_v1.pth in this directory")
    if not p.is_file():
        raise WeightsError(f"{p}: no such weights file or directory")
    return p


def read_state_dict(path: str | Path) -> OrderedDict:
    """Tensors of a checkpoint file, in our module's keys. Never runs pickled code."""
    p = resolve(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(p))
        else:
            raw = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, bad pickle, refused global, ...
        raise WeightsError(f"{p}: cannot be read as a SegVol checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(raw, dict) and "model" in raw and isinstance(raw["model"], dict):
        raw = raw["model"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsError(f"{p}: does not hold a state_dict of tensors")
    return from_official(raw, str(p))


def sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_official(path: str | Path) -> None:
    """Check an official file against its published sha256 (only files whose hash is known)."""
    p = resolve(path)
    expected = OFFICIAL_SHA256.get(p.name)
    if expected is None:
        raise WeightsError(f"{p}: no published hash for a file named {p.name}")
    got = sha256(p)
    if got != expected:
        raise WeightsError(f"{p}: sha256 {got} differs from the official {expected}")


def config_for(path: str | Path) -> SegVolConfig:
    """The model config stored beside the weights, else the official one."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        return CONFIGS["segvol-official"]
    data = json.loads(cfg_file.read_text())
    for key in ("spatial_size", "patch_size"):
        data[key] = tuple(data[key])
    return SegVolConfig(**data)


def tokenizer_dir(path: str | Path) -> Path | None:
    """Tokenizer files beside the weights (snapshot layout, or the official clip/ folder)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    for cand in (folder, folder / "clip"):
        if all((cand / f).is_file() for f in TOKENIZER_FILES):
            return cand
    return None


# ----------------------------------------------------------------------------- model
def load_into(model: SegVol, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names the first offending keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or misshaped:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {what}: {', '.join(keys[:3])}{more}")
        raise WeightsError(f"{source}: not a SegVol state_dict for this config; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_segvol(
    path: str | Path, config: SegVolConfig | None = None, verify: bool = False, fused_attention: bool = True
) -> SegVol:
    """Build SegVol and load ``path`` strictly; the model is on the CPU in eval mode."""
    p = resolve(path)
    if verify:
        verify_official(p)
    state = read_state_dict(p)
    config = config or config_for(path)
    tok = tokenizer_dir(path)
    with torch.device("meta"):
        model = SegVol(config, fused_attention=fused_attention)
    model.text_encoder.tokenizer = load_tokenizer(tok)
    model.to_empty(device="cpu")
    load_into(model, state, str(p))
    _reset_buffers(model)
    log.info("loaded %s (%d tensors, tokenizer %s)", p, len(state), tok or "bundled")
    return model.eval()


def _reset_buffers(model: SegVol) -> None:
    """Non-persistent buffers are not in the file; after ``to_empty`` they must be set again."""
    for name, buf in model.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))


def save_official(model: SegVol, directory: str | Path, fmt: str = "hf") -> Path:
    """Write the model in an official layout (``hf``: pytorch_model.bin; ``pth``: SegVol_v1.pth)
    with its config and the tokenizer files, so every loader here reads it back."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if fmt == "hf":
        target = out / "pytorch_model.bin"
        torch.save(to_official(state, "model."), target)
    elif fmt == "pth":
        target = out / "SegVol_v1.pth"
        torch.save({"model": to_official(state, "module."), "epoch": 0}, target)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    (out / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=1))
    model.text_encoder.tokenizer.save_pretrained(str(out))
    return target


def download(cache_dir: str | Path, repo_id: str = HF_REPO) -> Path:
    """Download the BAAI/SegVol snapshot (resumable, with progress) and return its directory."""
    cache_dir = Path(cache_dir)
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, allow_patterns=list(HF_FILES), local_dir=str(cache_dir / "BAAI-SegVol"))
    except Exception as e:
        raise WeightsError(
            f"could not download {repo_id} ({type(e).__name__}: {e}).\n"
            f"Without a network, put these files of huggingface.co/{repo_id} in {cache_dir / 'BAAI-SegVol'}: "
            f"{', '.join(HF_FILES)} (pytorch_model.bin is {OFFICIAL_SIZE['pytorch_model.bin']:,} bytes, "
            f"sha256 {OFFICIAL_SHA256['pytorch_model.bin']}), or pass the path of a SegVol_v1.pth."
        ) from e
    return Path(folder)


def find_or_download(weights: str | Path | None, cache_dir: str | Path) -> Path:
    """``weights`` if given, else a snapshot already in ``cache_dir``, else a download into it."""
    if weights:
        return resolve(weights)
    local = Path(cache_dir) / "BAAI-SegVol"
    if (local / "pytorch_model.bin").is_file() or (local / "model.safetensors").is_file():
        return resolve(local)
    log.info("no local SegVol weights in %s: downloading %s", local, HF_REPO)
    return resolve(download(cache_dir))

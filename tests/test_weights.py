"""Loading official-format checkpoints strictly, and refusing everything else clearly."""

from __future__ import annotations

import io
import json
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from conftest import SHARED
from segvol.model import CONFIGS, SegVol
from segvol.weights import (
    WeightsError,
    download,
    from_official,
    load_segvol,
    read_state_dict,
    save_official,
    to_official,
    verify_official,
)

MANIFEST = json.loads((SHARED / "reference" / "segvol_state_dict.json").read_text())["state_dict"]


def test_module_keys_map_to_the_official_manifest_both_ways():
    with torch.device("meta"):
        model = SegVol(CONFIGS["segvol-official"])
    official = to_official(model.state_dict(), prefix="")
    assert set(official) == set(MANIFEST)
    for key, t in official.items():
        assert list(t.shape) == MANIFEST[key]["shape"], key
    back = from_official(
        {"model." + k: torch.zeros(1) if "position_ids" not in k else torch.arange(77)[None] for k in MANIFEST}
    )
    assert set(back) == set(model.state_dict())


def test_seeded_checkpoints_load_strictly_in_both_formats(seeded_dir):
    a = load_segvol(seeded_dir / "pytorch_model.bin")
    b = load_segvol(seeded_dir / "SegVol_v1.pth")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    raw = torch.load(seeded_dir / "pytorch_model.bin", weights_only=True, mmap=True)
    key = "image_encoder.blocks.3.attn.qkv.weight"
    assert torch.equal(sa[key], raw["model." + key])
    clip = "text_encoder.clip_text_model.text_model.encoder.layers.5.mlp.fc1.weight"
    assert torch.equal(sa[clip.replace(".text_model.", ".")], raw["model." + clip])
    pos = a.text_encoder.clip_text_model.embeddings.position_ids
    assert torch.equal(pos[0], torch.arange(77))
    assert load_segvol(seeded_dir).state_dict().keys() == sa.keys()  # the snapshot folder itself


def test_truncated_file_is_refused_with_its_name(seeded_dir, tmp_path):
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes((seeded_dir / "pytorch_model.bin").read_bytes()[:50_000_000])
    with pytest.raises(WeightsError, match="pytorch_model.bin.*cannot be read"):
        load_segvol(bad)


def test_wrong_shape_tensor_is_named(tiny_model, tmp_path):
    state = to_official(tiny_model.state_dict())
    state["model.mask_decoder.iou_token.weight"] = torch.zeros(2, 3)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "segvol_config.json").write_text(json.dumps(tiny_model.config.to_dict()))
    with pytest.raises(WeightsError, match=r"wrong shape: mask_decoder.iou_token.weight \(2, 3\)"):
        load_segvol(tmp_path / "pytorch_model.bin")


def test_foreign_state_dict_names_missing_and_unexpected_keys(tmp_path):
    torch.save(
        OrderedDict({"backbone.conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}), tmp_path / "resnet.pth"
    )
    with pytest.raises(WeightsError) as e:
        load_segvol(tmp_path / "resnet.pth")
    msg = str(e.value)
    assert "resnet.pth" in msg and "missing: image_encoder.patch_embedding" in msg
    assert "2 unexpected: backbone.conv1.weight, fc.bias" in msg


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_with_code_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.target = str(marker)
    buf = io.BytesIO()
    torch.save({"model": {"x": torch.zeros(1)}, "evil": payload}, buf)
    (tmp_path / "SegVol_v1.pth").write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match="cannot be read"):
        read_state_dict(tmp_path / "SegVol_v1.pth")
    assert not marker.exists()
    raw = pickle.dumps(payload)  # a plain pickle, not even a torch zip
    (tmp_path / "plain.pth").write_bytes(raw)
    with pytest.raises(WeightsError):
        read_state_dict(tmp_path / "plain.pth")
    assert not marker.exists()


def test_our_export_round_trips_in_both_formats(tiny_model, tmp_path):
    for fmt in ("hf", "pth"):
        path = save_official(tiny_model, tmp_path / fmt, fmt)
        loaded = load_segvol(path)
        assert loaded.config == tiny_model.config
        s1, s2 = tiny_model.state_dict(), loaded.state_dict()
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    raw = torch.load(tmp_path / "pth" / "SegVol_v1.pth", weights_only=True)
    assert all(k.startswith("module.") for k in raw["model"])
    assert "module.text_encoder.clip_text_model.text_model.embeddings.position_ids" in raw["model"]


def test_safetensors_snapshot_is_preferred(tiny_model, tmp_path):
    from safetensors.torch import save_file

    save_official(tiny_model, tmp_path, "hf")
    state = {k: v.contiguous() for k, v in to_official(tiny_model.state_dict()).items()}
    state["model.mask_decoder.iou_token.weight"] = torch.full_like(state["model.mask_decoder.iou_token.weight"], 7.0)
    save_file(state, str(tmp_path / "model.safetensors"))
    assert torch.all(load_segvol(tmp_path).mask_decoder.iou_token.weight == 7.0)


def test_sha256_check_rejects_a_file_that_is_not_the_official_one(tiny_weights):
    with pytest.raises(WeightsError, match="differs from the official 500f2758"):
        verify_official(tiny_weights / "pytorch_model.bin")


def test_offline_download_says_which_files_to_put_where(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as e:
        download(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "BAAI-SegVol") in msg and "pytorch_model.bin" in msg and "tokenizer.json" in msg
    assert "SegVol_v1.pth" in msg


def test_missing_path_is_named(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        load_segvol(tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="no model.safetensors, pytorch_model.bin or SegVol_v1.pth"):
        load_segvol(tmp_path)

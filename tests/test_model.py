"""The fast kernels (fused attention, matmul upscaling) against the official ones."""

from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture
def models(tiny_model):
    fast, official = tiny_model, copy.deepcopy(tiny_model)
    official.set_fast_kernels(False)
    yield fast, official
    fast.set_fast_kernels(True)


def _prompts(model, batch: int):
    g = torch.Generator().manual_seed(0)
    size = torch.tensor(model.config.spatial_size, dtype=torch.float32)
    points = torch.rand(batch, 3, 3, generator=g) * (size - 1)
    labels = torch.tensor([[1.0, 0.0, 1.0]]).expand(batch, -1)
    boxes = torch.cat([torch.zeros(batch, 3), (size - 1).expand(batch, -1)], dim=1)
    return model.encode_text(["liver", "spleen"][:batch]), boxes, (points.round(), labels)


@pytest.mark.parametrize("with_box,with_points", [(False, False), (True, False), (False, True), (True, True)])
def test_fast_kernels_give_the_official_logits(models, with_box, with_points):
    fast, official = models
    volume = torch.rand(2, 1, *fast.config.spatial_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb_fast, emb_official = fast.encode_image(volume), official.encode_image(volume)
        torch.testing.assert_close(emb_fast, emb_official, rtol=0, atol=1e-5)
        text, boxes, points = _prompts(fast, 2)
        args = (text, boxes if with_box else None, points if with_points else None)
        torch.testing.assert_close(
            fast.decode(emb_official, *args), official.decode(emb_official, *args), rtol=0, atol=1e-5
        )


def test_fast_kernels_give_the_official_gradients(models):
    """The fine-tune trains through the decoder, so its gradients must agree as well."""
    fast, official = models
    emb = torch.randn(1, fast.config.embed_dim, *fast.config.embedding_grid)
    text, boxes, _ = _prompts(fast, 1)
    grads = []
    for model in (fast, official):
        model.zero_grad()
        model.decode(emb, text.detach(), boxes).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.mask_decoder.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "output_upscaling.0.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)

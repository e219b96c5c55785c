"""The predictor: encodings computed once per image and window, shared by all prompts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT, phantom
from segvol.engine import ImageTooLarge, SegVolPredictor
from segvol.labelmap import combine
from segvol.prompts import Prompt
from segvol.zoom_in import roi_from_mask, window_starts


class EncoderSpy:
    """Counts the windows that really go through the image encoder's forward."""

    def __init__(self, model):
        self.windows = 0
        self._forward = model.image_encoder.forward
        model.image_encoder.forward = self

    def __call__(self, x):
        self.windows += x.shape[0]
        return self._forward(x)


@pytest.fixture
def predictor(tiny_model):
    model = type(tiny_model)(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    p = SegVolPredictor(model, "cpu")
    p.spy = EncoderSpy(model)
    p.set_image(phantom((150, 40, 40)))
    return p


def _keys(targets) -> set:
    return {
        tuple(map(tuple, w.slice_dhw_in_padded_roi)) + (tuple(map(tuple, t.trace.zoom_in.roi_slice_dhw_in_crop)),)
        for t in targets
        if t.trace.zoom_in
        for w in t.trace.zoom_in.windows
    }


def test_window_starts_follow_the_official_placement():
    assert window_starts(57, 32, 0.5) == [0, 16, 25]
    assert window_starts(32, 32, 0.5) == [0]
    assert window_starts(256, 256, 0.5) == [0]
    assert window_starts(300, 256, 0.5) == [0, 44]


def test_roi_keeps_the_official_odd_shortfall_and_upper_clamp():
    m = torch.zeros(40, 300, 300, dtype=torch.bool)
    m[10:13, 100:201, 5:6] = True  # extents 3, 101, 1
    roi = roi_from_mask(m, (32, 256, 256))
    assert roi == ((0, 27), (23, 278), (0, 133))  # 29 short on d: 14 each side, so 31 wide, not 32
    m = torch.zeros(40, 300, 300, dtype=torch.bool)
    m[30:40, 290:300, 0:300] = True
    assert roi_from_mask(m, (32, 256, 256)) == ((19, 40), (167, 300), (0, 300))  # clamped to the size
    assert roi_from_mask(torch.zeros(4, 4, 4, dtype=torch.bool), (2, 2, 2)) is None


def test_second_prompt_runs_no_encoder_pass_for_windows_already_encoded(predictor):
    shape = predictor.image.shape_ijk
    first = predictor.predict([Prompt.make(shape, text="liver")])
    n_first = predictor.spy.windows
    assert n_first == 1 + len(first[0].trace.zoom_in.windows)
    again = predictor.predict([Prompt.make(shape, text="liver")])
    assert predictor.spy.windows == n_first
    torch.testing.assert_close(again[0].logits, first[0].logits, rtol=0, atol=0)
    predictor.predict([Prompt.make(shape, points=[[70, 20, 20]], point_labels=[1])], zoom_in=False)
    assert predictor.spy.windows == n_first  # zoom-out embedding reused
    box = predictor.predict([Prompt.make(shape, box=[40, 10, 10, 100, 30, 30])])
    new_windows = _keys(box) - _keys(first)
    assert predictor.spy.windows == n_first + len(new_windows)


def test_several_categories_share_encoder_passes_and_match_single_calls(predictor, tiny_model):
    shape = predictor.image.shape_ijk
    names = ["liver", "spleen", "left kidney"]
    together = predictor.predict([Prompt.make(shape, text=n) for n in names])
    windows = set()
    for t in together:
        zi = t.trace.zoom_in
        windows |= {
            (tuple(map(tuple, zi.roi_slice_dhw_in_crop)), tuple(map(tuple, w.slice_dhw_in_padded_roi)))
            for w in zi.windows
        }
    assert predictor.spy.windows <= 1 + len(windows)
    assert predictor.stats["decoder_passes"] == sum(1 + len(t.trace.zoom_in.windows) for t in together)
    for name, t in zip(names, together):
        single = SegVolPredictor(tiny_model, "cpu")
        single.set_image(phantom((150, 40, 40)))
        (alone,) = single.predict([Prompt.make(shape, text=name)])
        torch.testing.assert_close(t.logits, alone.logits, rtol=0, atol=1e-5)


def test_batched_window_encoding_equals_one_by_one(tiny_model):
    shape = (150, 40, 40)
    results = []
    for batch in (1, 4):
        p = SegVolPredictor(tiny_model, "cpu", window_batch=batch)
        p.set_image(phantom(shape))
        results.append(p.predict([Prompt.make(shape, text="liver")])[0].logits)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-4)


def test_outputs_are_on_the_image_grid(predictor):
    (t,) = predictor.predict([Prompt.make(predictor.image.shape_ijk, text="aorta")])
    mask = predictor.mask_on_image(t)
    logits = predictor.logits_on_image(t)
    assert mask.shape == logits.shape == (150, 40, 40) and mask.dtype == np.uint8
    crop = predictor.image.crop
    outside = np.ones(mask.shape, bool)
    outside[tuple(slice(a, b) for a, b in zip(crop.start_ijk, crop.stop_ijk))] = False
    assert np.all(logits[outside] == -1000) and np.all(mask[outside] == 0)
    inside = ~outside
    np.testing.assert_array_equal(mask[inside], (torch.sigmoid(torch.from_numpy(logits[inside])) > 0.5).numpy())


def test_set_image_of_the_same_content_keeps_the_encodings(predictor):
    predictor.predict([Prompt.make(predictor.image.shape_ijk, text="liver")], zoom_in=False)
    n = predictor.spy.windows
    predictor.set_image(phantom((150, 40, 40)))
    predictor.predict([Prompt.make(predictor.image.shape_ijk, text="spleen")], zoom_in=False)
    assert predictor.spy.windows == n
    predictor.set_image(phantom((150, 40, 40), seed=1))
    predictor.predict([Prompt.make(predictor.image.shape_ijk, text="spleen")], zoom_in=False)
    assert predictor.spy.windows == n + 1


def test_predict_without_image_is_an_error(tiny_model):
    with pytest.raises(RuntimeError, match="no image set"):
        SegVolPredictor(tiny_model, "cpu").predict([Prompt(text="liver")])


def test_recent_images_stay_encoded_within_the_cache_budget(tiny_model):
    p = SegVolPredictor(tiny_model, "cpu", cache_mb=1e9)
    spy = EncoderSpy(p.model)
    a, b = phantom((60, 40, 12), seed=1), phantom((60, 40, 12), seed=2)
    shape = a.shape
    for image in (a, b, a, b):
        p.set_image(image)
        p.predict([Prompt.make(shape, text="liver")], zoom_in=False)
    assert spy.windows == 2  # one zoom-out encoding per image; going back costs none
    one_image = p.cache_bytes() / 2
    p.cache_mb = 1.5 * one_image / 2**20  # room for one image only
    p.set_image(a)
    p.predict([Prompt.make(shape, text="liver")], zoom_in=False)
    assert p.stats["images_evicted"] == 1 and p.cache_bytes() <= p.cache_mb * 2**20
    p.set_image(b)  # evicted: encoded again
    p.predict([Prompt.make(shape, text="liver")], zoom_in=False)
    assert spy.windows == 3


def test_bf16_is_an_opt_in_approximation(tiny_model):
    shape = (60, 40, 12)
    results = {}
    for precision in ("fp32", "bf16"):
        p = SegVolPredictor(tiny_model, "cpu", precision=precision)
        p.set_image(phantom(shape))
        (t,) = p.predict([Prompt.make(shape, text="liver")])
        results[precision] = t.logits
    assert results["bf16"].dtype == torch.float32
    diff = (results["bf16"] - results["fp32"]).abs()
    assert 0 < float(diff.max()) < 5  # close, but not the faithful numbers: hence opt-in
    with pytest.raises(ValueError, match="precision 'int8'"):
        SegVolPredictor(tiny_model, "cpu", precision="int8")


def test_batched_decoding_equals_one_by_one(tiny_model):
    """Several categories, a click, a box and text with a click: prompts with the same token
    layout share decoder calls, the results do not change beyond float noise."""
    shape = (150, 40, 40)
    prompts = [Prompt.make(shape, text=n) for n in ("liver", "spleen", "aorta", "left kidney")]
    prompts += [
        Prompt.make(shape, points=[[75, 20, 20]], point_labels=[1]),
        Prompt.make(shape, box=[40, 10, 10, 110, 30, 30]),
        Prompt.make(shape, text="liver", points=[[60, 18, 22], [90, 20, 20]], point_labels=[1, 0]),
    ]
    runs = []
    for batch in (1, 8):
        p = SegVolPredictor(tiny_model, "cpu", decode_batch=batch)
        p.set_image(phantom(shape))
        runs.append((p.predict(prompts), dict(p.stats)))
    (one, one_stats), (many, many_stats) = runs
    assert one_stats["decoder_passes"] == many_stats["decoder_passes"] == one_stats["decoder_calls"]
    assert many_stats["decoder_calls"] < one_stats["decoder_calls"] / 2
    for a, b in zip(one, many):
        assert a.trace == b.trace
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)


def test_label_map_gives_overlaps_to_the_highest_logit():
    rng = np.random.default_rng(0)
    logits = [torch.from_numpy(rng.normal(0, 2, (6, 7, 8)).astype(np.float32)) for _ in range(4)]
    logits[2][0, 0, :] = logits[1][0, 0, :] = 5.0  # a tie: the earlier target keeps it
    values = [3, 7, 9, 200]
    stacked = np.where(np.stack([torch.sigmoid(x).numpy() > 0.5 for x in logits]), np.stack(logits), -np.inf)
    expected = np.where(np.isfinite(stacked.max(0)), np.asarray(values, np.uint8)[stacked.argmax(0)], 0)
    out = combine(logits, values)
    assert out.dtype == torch.uint8 and (out[0, 0] == 7).all()
    np.testing.assert_array_equal(out.numpy(), expected)


def test_a_volume_too_large_for_memory_is_refused_before_it_is_read(tiny_model):
    huge = np.broadcast_to(np.int16(0), (4096, 4096, 4096))  # 69 G voxels, no memory behind them
    p = SegVolPredictor(tiny_model, "cpu")
    with pytest.raises(ImageTooLarge, match=r"4096x4096x4096 \(68719 M voxels\) needs about 1024.0 GB"):
        p.set_image(huge)
    assert p.image is None and p.cache_bytes() == 0


def test_an_allocation_failure_is_a_clear_error_not_a_crash(tmp_path):
    """A real failed allocation: the address space is capped just above what the process uses."""
    script = tmp_path / "cap.py"
    script.write_text(
        textwrap.dedent(
            """
            import resource, sys
            import numpy as np, torch
            from segvol.engine import ImageTooLarge, SegVolPredictor
            from segvol.model import CONFIGS, SegVol
            from segvol.prompts import Prompt

            p = SegVolPredictor(SegVol(CONFIGS["segvol-tiny"]), "cpu")
            ct = np.zeros((512, 512, 300), np.int16)
            ct[100:400, 100:400, 50:250] = 40
            small = np.full((60, 50, 40), -1000, np.int16)
            small[10:50, 10:40, 5:35] = np.random.default_rng(0).normal(40, 100, (40, 30, 30))
            used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (used + 200 * 2**20, resource.RLIM_INFINITY))
            try:
                p.set_image(ct)
            except ImageTooLarge as e:
                print("refused:", e)
            p.set_image(small)  # the predictor still works
            (target,) = p.predict([Prompt.make(small.shape, text="liver")])
            print("then segmented", tuple(target.logits.shape))
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "refused: out of memory on cpu while preprocessing a 512x512x300 volume" in out.stdout
    assert "then segmented (30, 30, 40)" in out.stdout


def test_text_embeddings_are_kept_in_a_bounded_lru(tiny_model):
    predictor = SegVolPredictor(tiny_model, "cpu")
    predictor.texts.max_entries = 4
    for n in range(10):  # texts a client chose
        predictor.text_embedding(f"organ {n}")
    assert predictor.texts.names() == [f"organ {n}" for n in range(6, 10)]
    predictor.text_embedding("organ 6")  # used again: kept, the oldest other one goes next
    predictor.text_embedding("organ 10")
    assert predictor.texts.names() == ["organ 8", "organ 9", "organ 6", "organ 10"]

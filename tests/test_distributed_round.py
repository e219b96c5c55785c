"""A round in two processes (torchrun, gloo on a CPU) writes one process's version, to float noise.

The two-process round runs as the server's train task runs it with ``train_processes 2``: this
process holds train.lock and launches ``python -m torch.distributed.run --nproc_per_node 2
apps/segvol round --lock-held``; each process encodes half of the images and computes half of every batch.

Tolerances, from measurements on this config (8 steps of batch 4, lr 3e-3, one thread per process
in both runs, as torchrun gives its workers): losses and Dice came out identical; the weights
differ by the order the four samples' gradients are summed ((g0 + g1) + g2 + g3 in one process,
(g0 + g2) + (g1 + g3) over two), which AdamW turns into at most 3.3e-5 (relative L2 to the update
1.9e-5), on the attention key biases, whose true gradient is zero (softmax ignores a shift), so
Adam scales pure float noise up to a step. With two threads in the one process the losses differ
by 6e-8 and the weights by 7e-5. Chosen, about 100x the noise: losses 1e-5, Dice 1e-3 (one voxel),
weights 3e-3 max abs and 2e-3 relative L2 to the update. A real fault (a sample on the wrong
process, a gradient not summed, views out of order) moves them by 1e-2 or more.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phantoms import write_phantoms

APP = Path(__file__).resolve().parent.parent / "apps" / "segvol"
CONF = {
    "weights": "seeded",
    "model_config": "segvol-tiny",
    "zoom_in": "false",
    "device": "cpu",
    "promote_min_gain": "-1",  # promoted or not is not the point here: the numbers are
    "promote_replay_margin": "1",
}
ROUND = {"steps": 8, "batch": 4, "lr": 3e-3, "seed": 1}
TOL_LOSS, TOL_DICE, TOL_WEIGHT, TOL_WEIGHT_L2 = 1e-5, 1e-3, 3e-3, 2e-3


@pytest.fixture
def app_of(tmp_path, monkeypatch):
    """SegVolApp on four labelled phantoms, built as MONAI Label's train process builds it."""
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)  # no folder watcher
    studies = tmp_path / "studies"
    write_phantoms(studies, 4)

    def build(name: str, **conf: str):
        from main import SegVolApp

        return SegVolApp(str(APP), str(studies), dict(CONF, versions_dir=str(tmp_path / name), **conf))

    return build


def test_a_round_in_two_processes_writes_the_one_process_version(app_of):
    from lib.rounds.progress import RoundProgress

    one = app_of("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers: the noise left is the distribution's own
    try:
        t0 = time.time()
        single = one._trainers["segvol"](dict(ROUND), one.datastore())
        t1 = time.time()
    finally:
        torch.set_num_threads(threads)
    two = app_of("two", train_processes="2")
    t2 = time.time()
    double = two._trainers["segvol"](dict(ROUND), two.datastore())
    t3 = time.time()
    assert (single["processes"], double["processes"]) == (1, 2) and single["batch"] == double["batch"] == 4
    assert single["views"] == double["views"] and single["encodings"] == double["encodings"]
    assert single["labels"] == double["labels"]
    progress = RoundProgress(two.service.versions.root).read()  # written by the launched round's rank 0
    assert progress["state"] == "done" and progress["result"]["version"] == double["version"], progress
    tolerance = dict.fromkeys(("loss_first", "loss_last"), TOL_LOSS)
    tolerance.update(dict.fromkeys(("val_dice_before", "val_dice_after", "replay_dice"), TOL_DICE))
    diffs = {key: abs(single[key] - double[key]) for key in tolerance}
    assert all(diffs[key] <= tol for key, tol in tolerance.items()), diffs
    base = {k: v.cpu() for k, v in one.service._base_state.items()}
    a = load_file(str(one.service.versions.root / single["version"] / "decoder.safetensors"))
    b = load_file(str(two.service.versions.root / double["version"] / "decoder.safetensors"))
    assert a.keys() == b.keys() == base.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    l2 = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    update = sum(float(((a[k] - base[k]) ** 2).sum()) for k in a) ** 0.5
    assert update > 0.01 and worst <= TOL_WEIGHT and l2 / update <= TOL_WEIGHT_L2, (worst, l2 / update)
    print(
        f"\nround, 1 process: {single['seconds']} s ({t1 - t0:.1f} s wall); 2 processes: {double['seconds']} s "
        f"({t3 - t2:.1f} s wall with torchrun's start); weights max |diff| {worst:.2e}, "
        f"relative L2 {l2 / update:.2e}; {diffs}"
    )


def test_a_batch_the_processes_cannot_share_is_refused_before_anything_starts(app_of):
    from lib.serving.validation import RequestError

    app = app_of("odd", train_processes="2")
    trainer = app._trainers["segvol"]
    with pytest.raises(RequestError, match="a batch of 3 cannot be split evenly over 2 processes"):
        trainer(dict(ROUND, batch=3), app.datastore())
    assert app.service.predictor is None  # no model loaded, nothing encoded, no round begun
    assert not (app.service.versions.root / "round.json").exists()
    assert not (app.service.versions.root / ".embeddings").exists()
    from lib.settings import AppSettings, ConfError

    with pytest.raises(ConfError, match="train_batch 3: the batch is split evenly over the 2 processes"):
        AppSettings.from_conf({"train_batch": "3", "train_processes": "2"}, Path("model"))

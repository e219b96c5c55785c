"""``python -m segvol``: segment a CT from the command line, list the categories, time the stages,
inspect and switch the fine-tuned decoder versions a server serves.

The engine's command line: it knows the model and its files, nothing of a server or an app.
Each subcommand is a ``_<name>_parser`` that declares its options and the ``cmd_<name>`` it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the commands import what they run, so --help and categories start fast
    from segvol.engine import Prediction, SegVolPredictor
    from segvol.training.versions import VersionStore
    from segvol.vocabulary import Resolved

log = logging.getLogger("segvol")

DEFAULT_CACHE = Path(os.environ.get("SEGVOL_HOME", Path.home() / ".cache" / "segvol"))
PRECISION_CHOICES = ("fp32", "bf16", "fp16")

SEGMENT_EPILOG = """\
Prompts are voxel indices (i, j, k) of the image array as stored, the convention of
OHIF and 3D Slicer. Give any combination of --text, --box and points:
  python -m segvol segment --image ct.nii.gz --output liver.nii.gz --text liver
  python -m segvol segment --image ct.nii.gz --output m.nii.gz --text liver spleen   (label map 1, 2)
  python -m segvol segment --image ct.nii.gz --output m.nrrd --box 30 50 20 60 90 35
  python -m segvol segment --image ct.nii.gz --output m.nii.gz --point 110 86 25 --negative-point 41 70 26
Weights: --weights takes a BAAI/SegVol snapshot folder, pytorch_model.bin, model.safetensors
or SegVol_v1.pth. Without it, the snapshot is looked for in $SEGVOL_HOME (default
~/.cache/segvol) and downloaded there from Hugging Face on first use.
"""

VERSIONS_EPILOG = """\
  python -m segvol versions list --dir apps/segvol/model/versions
  python -m segvol versions show v0003
  python -m segvol versions activate v0002 --reason 'v0003 misses small livers'
  python -m segvol versions rollback"""

Subparsers = argparse._SubParsersAction  # what add_subparsers returns


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m segvol", description="SegVol: text, point and box prompted CT segmentation."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every stage")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_segment_parser, _bench_parser, _bench_round_parser, _categories_parser, _versions_parser):
        add(sub)
    return p


# ---------------------------------------------------------------------- segment
def _segment_parser(sub: Subparsers) -> None:
    s = sub.add_parser(
        "segment",
        help="segment one volume",
        epilog=SEGMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.set_defaults(run=cmd_segment)
    s.add_argument(
        "--image", required=True, type=Path, help="CT volume in HU: .nii, .nii.gz, .nrrd, or a DICOM series folder"
    )
    s.add_argument("--output", required=True, type=Path, help="mask to write (uint8, the image's grid and affine)")
    s.add_argument("--weights", type=Path, help="snapshot folder or checkpoint file (default: cache / download)")
    s.add_argument(
        "--text",
        nargs="+",
        default=[],
        metavar="NAME",
        help="category name(s); several give a label map with values 1..N in this order",
    )
    s.add_argument(
        "--box", nargs=6, type=int, metavar=("I0", "J0", "K0", "I1", "J1", "K1"), help="inclusive box in voxel indices"
    )
    for flag, what in (("--point", "positive"), ("--negative-point", "negative")):
        s.add_argument(
            flag,
            nargs=3,
            type=int,
            action="append",
            default=[],
            metavar=("I", "J", "K"),
            help=f"{what} click (repeatable)",
        )
    s.add_argument("--no-zoom-in", action="store_true", help="stop after the zoom-out pass (faster, coarser)")
    s.add_argument("--logits", type=Path, help="also write float32 logits of the first target (-1000 where unseen)")
    s.add_argument("--report", type=Path, help="write a JSON record: crop, model-space prompts, ROI, windows, timings")
    s.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    s.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISION_CHOICES,
        help="fp32 (faithful, default); bf16/fp16 are faster approximations (see README)",
    )
    s.add_argument(
        "--overlap",
        type=float,
        default=0.5,
        help="zoom-in window overlap: 0.5 (faithful, default); lower means fewer windows, approximate (see README)",
    )
    s.add_argument("--verify-sha256", action="store_true", help="check the weights against the official hash")
    s.add_argument(
        "--exact-text",
        action="store_true",
        help="send each --text as typed, as the official pipeline does (default: a synonym goes as its trained name)",
    )


def cmd_segment(a: argparse.Namespace) -> int:
    from segvol.engine import SegVolPredictor
    from segvol.io import read_volume, write_like
    from segvol.preprocess import check_volume
    from segvol.prompts import Prompt
    from segvol.vocabulary import resolve_texts
    from segvol.weights import find_or_download, load_segvol

    t0 = time.perf_counter()
    volume = read_volume(a.image)
    texts = resolve_texts(a.text, exact=a.exact_text)
    points = a.point + a.negative_point
    labels = [1] * len(a.point) + [0] * len(a.negative_point)
    check_volume(volume.array)
    shape = volume.array.shape
    prompts = [Prompt.make(shape, t.name if t else None, points, labels, a.box) for t in (texts or [None])]
    weights = find_or_download(a.weights, DEFAULT_CACHE)
    model = load_segvol(weights, verify=a.verify_sha256)
    predictor = SegVolPredictor(model, a.device, zoom_in=not a.no_zoom_in, overlap=a.overlap, precision=a.precision)
    log.info("loaded %s on %s in %.1f s", weights, predictor.device, time.perf_counter() - t0)
    predictor.set_image(volume.array)
    targets = predictor.predict(prompts)
    write_like(volume, predictor.labelmap_on_image(targets, list(range(1, len(targets) + 1))), a.output)
    names = [t.typed for t in texts] if texts else ["target"]
    sidecar = a.output.with_name(a.output.name.split(".")[0] + ".labels.json")
    sidecar.write_text(json.dumps({n: i + 1 for i, n in enumerate(names)}, indent=1) + "\n")
    if a.logits:
        write_like(volume, predictor.logits_on_image(targets[0]), a.logits)
    if a.report:
        a.report.write_text(json.dumps(_segment_report(a, weights, predictor, names, texts, targets), indent=1) + "\n")
    for n, t in zip(names, targets):
        log.info("%s: %d voxels", n, int(t.mask.sum()))
    log.info("wrote %s (labels %s) in %.1f s", a.output, sidecar, time.perf_counter() - t0)
    return 0


def _segment_report(
    a: argparse.Namespace,
    weights: Path,
    predictor: SegVolPredictor,
    names: list[str],
    texts: list[Resolved],
    targets: list[Prediction],
) -> dict:
    """The --report record: what was asked, what the model received and saw, and what it cost."""
    return {
        "image": str(a.image),
        "weights": str(weights),
        "device": str(predictor.device),
        "labels": {n: i + 1 for i, n in enumerate(names)},
        "texts": [{"typed": t.typed, "sent": t.name, "via": t.via, "suggestions": list(t.suggestions)} for t in texts],
        "targets": [t.trace.as_json() for t in targets],
        "timings_s": {k: round(v, 4) for k, v in predictor.timings.items()},
        "stats": dict(predictor.stats),
    }


# ---------------------------------------------------------------------- bench
def _bench_parser(sub: Subparsers) -> None:
    b = sub.add_parser(
        "bench",
        help="time each stage, fast path against the faithful one",
        description="Times preprocessing, encoder windows, decoder, post-processing and writing for "
        "a first prompt, further prompts on the same image and many categories in one call.",
    )
    b.set_defaults(run=cmd_bench)
    _model_options(b)
    b.add_argument("--image", type=Path, help="a CT to use (default: a synthetic one of --shape)")
    b.add_argument("--shape", nargs=3, type=int, default=[512, 512, 200], metavar=("I", "J", "K"))
    b.add_argument("--categories", type=int, default=10, help="categories in the many-category scenario")
    b.add_argument("--window-batch", type=int, default=4, help="zoom-in windows encoded per batch")
    b.add_argument("--decode-batch", type=int, default=0, help="decoder passes per batch (0: 8 on a GPU, 1 on a CPU)")
    b.add_argument("--faithful", action="store_true", help="also run the plain path and compare outputs")
    b.add_argument("--overlap", type=float, default=0.5, help="zoom-in overlap of the fast path (0.5: faithful)")
    b.add_argument("--no-zoom-in", action="store_true")
    b.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES, help="for the fast path")
    b.add_argument("--device", default="auto")


def _model_options(p: argparse.ArgumentParser) -> None:
    """--weights and --config, as both benches take them."""
    p.add_argument("--weights", type=Path, help="checkpoint (default: random weights of --config, seed 0)")
    p.add_argument("--config", default="segvol-official", help="model config without --weights")


def cmd_bench(a: argparse.Namespace) -> int:
    from segvol.bench import build_model, run, synthetic_ct
    from segvol.io import read_volume

    t0 = time.perf_counter()
    model, what = build_model(a.weights, a.config)
    load_s = time.perf_counter() - t0 if a.weights else None
    image = read_volume(a.image).array if a.image else synthetic_ct(tuple(a.shape))
    log.info("bench with %s on %s", what, a.image or f"a synthetic CT of {tuple(a.shape)}")
    table = run(
        model,
        image,
        a.device,
        a.categories,
        a.faithful,
        a.window_batch,
        not a.no_zoom_in,
        a.precision,
        a.decode_batch,
        load_s,
        a.overlap,
    )
    print(table)
    return 0


# ---------------------------------------------------------------------- bench-round
def _bench_round_parser(sub: Subparsers) -> None:
    r = sub.add_parser(
        "bench-round",
        help="time a fine-tune round: encoding the views against the decoder steps",
        description="Two rounds on synthetic labelled CTs, the second with the first's encodings on disk.",
    )
    r.set_defaults(run=cmd_bench_round)
    _model_options(r)
    r.add_argument("--shape", nargs=3, type=int, default=[256, 256, 64], metavar=("I", "J", "K"))
    r.add_argument("--images", type=int, default=3, help="labelled CTs (one held out)")
    r.add_argument("--steps", type=int, default=200, help="decoder steps (the app's default train_steps)")
    r.add_argument("--windows", type=int, default=4, help="zoom-in windows per label (the app's train_windows)")
    r.add_argument("--device", default="cpu")


def cmd_bench_round(a: argparse.Namespace) -> int:
    from segvol.bench import build_model
    from segvol.training.bench_round import run

    model, what = build_model(a.weights, a.config)
    log.info("round bench with %s", what)
    print(run(model, tuple(a.shape), a.images, a.steps, a.windows, a.device))
    return 0


# ---------------------------------------------------------------------- categories
def _categories_parser(sub: Subparsers) -> None:
    c = sub.add_parser("categories", help="list the categories SegVol was trained with")
    c.set_defaults(run=cmd_categories)
    c.add_argument("--search", default="", help="only names or synonyms containing this text")
    c.add_argument("--json", action="store_true", help="print JSON")


def cmd_categories(a: argparse.Namespace) -> int:
    from segvol.vocabulary import default_vocabulary

    found = default_vocabulary().search(a.search)
    if a.json:
        fields = ("index", "name", "preferred_name", "region", "type")
        print(json.dumps([{f: getattr(c, f) for f in fields} for c in found], indent=1))
        return 0
    for c in found:
        extra = f"  (= {c.preferred_name})" if c.preferred_name != c.name else ""
        print(f"{c.index:4d}  {c.name}{extra}  [{c.region or '-'}, {c.type or '-'}]")
    print(f"{len(found)} categories", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- versions
def _versions_parser(sub: Subparsers) -> None:
    v = sub.add_parser(
        "versions",
        help="list, show, activate or roll back fine-tuned decoder versions",
        description="The versions a server's fine-tune rounds wrote: its --conf versions_dir (--dir), or, "
        "for a team on several hosts, its --conf team_db PostgreSQL database (--team-db). The server "
        "serves the active one and checks it before every request (every host within a second), so "
        "activate and rollback take effect at its next request, with no restart.",
        epilog=VERSIONS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.set_defaults(run=cmd_versions)
    v.add_argument("action", choices=("list", "show", "activate", "rollback"))
    v.add_argument("name", nargs="?", help="a version (vNNNN) or 'base', for show and activate")
    where = v.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", type=Path, help="the versions folder (a server's --conf versions_dir)")
    where.add_argument(
        "--team-db", metavar="URL", help="the team's PostgreSQL (a server's --conf team_db postgresql://...)"
    )
    v.add_argument("--reason", default="", help="recorded in history.jsonl with the switch")


def cmd_versions(a: argparse.Namespace) -> int:
    from segvol.training.versions import VersionError, VersionStore

    if a.team_db:
        from segvol.postgres import is_url
        from segvol.training.versions_db import DatabaseVersions

        if not is_url(a.team_db):
            raise VersionError(f"--team-db {a.team_db!r}: expected postgresql://user@host:port/database")
        with tempfile.TemporaryDirectory(prefix="segvol-versions-") as copies:  # what activate checks
            return _versions(DatabaseVersions(a.team_db, copies), a)
    if not a.dir.is_dir():
        raise VersionError(f"no versions folder {a.dir} (give the server's --conf versions_dir with --dir)")
    return _versions(VersionStore(a.dir), a)


def _versions(store: VersionStore, a: argparse.Namespace) -> int:
    from segvol.training.versions import VersionError

    active = store.active()
    if a.action == "list":
        _list_versions(store, active)
    elif a.action == "show":
        _show_version(store, a.name or active, active)
    elif a.action == "activate":
        if not a.name:
            raise VersionError("activate needs a version name (vNNNN) or 'base'")
        store.activate(a.name, a.reason or f"activated with python -m segvol versions (was {active})")
        print(f"{a.name} is active (was {active}); the server serves it from its next request")
    else:
        name = store.rollback(a.reason or f"rolled back with python -m segvol versions (was {active})")
        print(f"{name} is active again (was {active}); the server serves it from its next request")
    return 0


def _list_versions(store: VersionStore, active: str) -> None:
    """One line per version, the active one starred: held-out Dice before and after, replay Dice, decision."""
    from segvol.training.versions import BASE

    head = f"{'':2}{'version':8}  {'written':19}  {'train/held':>10}  {'held-out Dice':>15}  {'replay':>6}"
    print(head + "  decision")
    print(f"{'*' if active == BASE else ' '} {'base':8}  {'':19}  {'':>10}  {'':>15}  {'':>6}  the loaded weights")
    for name in store.names():
        m = store.meta(name)
        labels = m.get("labels", [])
        held = sum(1 for x in labels if x.get("held_out"))
        dice = f"{m.get('val_dice_before', float('nan')):.3f}->{m.get('val_dice_after', float('nan')):.3f}"
        split = f"{len(labels) - held}/{held}"
        print(
            f"{'*' if active == name else ' '} {name:8}  {m.get('written', ''):19}  {split:>10}  {dice:>15}  "
            f"{m.get('replay_dice', float('nan')):6.3f}  {m.get('status', '?')}"
        )


def _show_version(store: VersionStore, name: str, active: str) -> None:
    """A version's record (or the base's), then every switch to or from it."""
    from segvol.training.versions import BASE

    if name == BASE:
        print(json.dumps({"name": BASE, "active": active == BASE}, indent=1))
    else:
        print(json.dumps(dict(store.meta(name), active=active == name), indent=1))
    for event in store.history():
        if name in (event["from"], event["to"]):
            print(f"{event['time']}  {event['from']} -> {event['to']}  {event['reason']}")


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if a.verbose or a.command == "segment" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from segvol.errors import USER_ERRORS

    try:
        return a.run(a)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

"""The app's own commands, run without a server: ``python apps/segvol <command>``.

    python apps/segvol round --studies <folder or DICOMweb URL> [--conf k v ...] [--steps N --batch B ...]
    torchrun --nproc_per_node 2 apps/segvol round --studies ... --batch 2
    python apps/segvol preannotate --studies <DICOMweb URL or folder> --categories liver,spleen [--workers 2]
    python apps/segvol versions list|show|activate|rollback [--conf versions_dir DIR]

Python runs this file with apps/segvol first on sys.path, so the app's ``lib`` imports as the
server imports it (torchrun starts ``python -u apps/segvol round ...`` in each process).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lib.batch.preannotate import FAILED, Job, PreannotateError, resolve_categories
from lib.batch.preannotate import run as preannotate
from lib.datastores import open_datastore
from lib.rounds.launch import AppArgs
from lib.rounds.reviewed import reviewed_labels
from lib.rounds.round import PARAMETERS, run_round
from lib.serving.host import ModelHost
from lib.serving.validation import RequestError
from lib.settings import HELP, AppSettings, ConfError
from lib.team.team import Team, store_path
from segvol.cli import main as engine_cli
from segvol.errors import USER_ERRORS
from segvol.training import distributed
from segvol.weights import find_or_download

APP = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("SEGVOL_HOME", Path.home() / ".cache" / "segvol"))  # as python -m segvol's

ROUND_DOC = """\
One fine-tune round, in one process or several (torchrun), without a server: whoever schedules
rounds (cron) runs them so, and a round in several processes needs an entry point torchrun can
start in each. It builds the model host and the datastore on the studies and --conf the server
uses (the same versions folder and train.lock, so never two rounds at once), runs the round as the
server's train task does, and prints rank 0's result as JSON (or writes it to --output).
Exit status: 0 done (promoted, rejected or skipped: see "status"), 2 a refused request, 1 anything
else (a bad --conf names itself)."""

PREANNOTATE_DOC = """\
Segments the categories in every series that has no label and no draft yet,
with a pool of Ray workers (one model each; one GPU each where there are GPUs), and stores
each result as a draft: in a DICOMweb archive a SEG marked as a draft (AUTOMATIC segments),
in a folder the 'original' label. Annotators open a draft, correct it and save a final
label; rounds learn from final labels only. A second run skips what is stored; failed
series are listed. Exit status 1 when a series failed."""


def _round_parser(sub) -> None:
    r = sub.add_parser(
        "round",
        help="one fine-tune round of the decoder, in one process or several (torchrun)",
        description=ROUND_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--studies", required=True, help="the datastore: a folder or a DICOMweb URL")
    r.add_argument(
        "--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="app option, as the server's"
    )
    for name, param in PARAMETERS.items():
        r.add_argument(f"--{name}", type=param.kind, help=f"{param.help} (default: from --conf)")
    r.add_argument("--output", help="write the result here (rank 0) instead of printing it")
    r.add_argument(
        "--lock-held",
        action="store_true",
        help="the process that started this one holds train.lock (the train task with train_processes > 1)",
    )


def _preannotate_parser(sub) -> None:
    pa = sub.add_parser(
        "preannotate",
        help="store a draft label for every series of an archive or folder, with Ray",
        description=PREANNOTATE_DOC,
        epilog="  python apps/segvol preannotate --studies http://127.0.0.1:8042/dicom-web "
        "--categories liver,spleen --workers 2\n"
        "  python apps/segvol preannotate --studies sample-datastore --categories liver --ray-address auto",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pa.add_argument("-v", "--verbose", action="store_true", help="log every stage")
    pa.add_argument(
        "--studies",
        required=True,
        help="a DICOMweb URL (basic auth from MONAI_LABEL_DICOMWEB_USERNAME / _PASSWORD) or a folder of images",
    )
    pa.add_argument("--categories", required=True, help="comma-separated category names (liver,spleen,...)")
    pa.add_argument("--workers", type=int, default=1, help="Ray actors, one model each (1)")
    pa.add_argument("--ray-address", help="a running Ray cluster (auto, ray://host:10001); default: a local Ray")
    pa.add_argument("--cpus", type=int, help="CPUs of the local Ray instance (default: all), shared by the workers")
    pa.add_argument(
        "--weights",
        default="hub",
        help="as the server's --conf weights: snapshot folder or checkpoint; 'hub' (default: "
        "apps/segvol/model/BAAI-SegVol, downloaded on first use); 'seeded' (untrained, tests)",
    )
    pa.add_argument("--model-config", default="segvol-official", help="segvol-tiny with --weights seeded only")
    pa.add_argument("--no-zoom-in", action="store_true", help="the zoom-out pass only (faster, coarser)")
    pa.add_argument("--device", default="auto", help="auto (CUDA where the worker has a GPU), cpu or cuda")
    pa.add_argument(
        "--versions-dir",
        type=Path,
        default=APP / "model" / "versions",
        help="the server's --conf versions_dir: drafts come from the decoder version it serves",
    )
    pa.add_argument(
        "--cache",
        type=Path,
        default=CACHE / "preannotate",
        help="DICOMweb: series downloads (each removed once done) and the archive's SEG index",
    )
    pa.add_argument(
        "--team-db",
        type=Path,
        help="the server's team state (its --conf team_db; for a folder <folder>/.segvol/team.sqlite "
        "by default): drafts are recorded as served results, so a draft saved unedited is AUTOMATIC",
    )
    pa.add_argument(
        "--report", type=Path, help="write one JSON line per series run: status, error, seconds, voxels, stored"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python apps/segvol", description="segvol-label's own commands, without a server.")
    sub = p.add_subparsers(dest="command", required=True)
    _round_parser(sub)
    _preannotate_parser(sub)
    _versions_parser(sub)
    return p


def _versions_parser(sub) -> None:
    v = sub.add_parser(
        "versions",
        help="list, show, activate or roll back the app's decoder versions (python -m segvol versions, "
        "in the folder the app's --conf gives)",
    )
    v.add_argument("action", choices=("list", "show", "activate", "rollback"))
    v.add_argument("name", nargs="?", help="a version (vNNNN) or 'base', for show and activate")
    v.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="as the server's")
    v.add_argument("--reason", default="", help="recorded in history.jsonl with the switch")


def cmd_versions(a: argparse.Namespace) -> int:
    """The engine's command on the versions folder the server with this --conf serves from."""
    try:
        folder = AppSettings.from_conf(dict(a.conf), APP / "model").versions_dir
    except ConfError as e:
        print(f"segvol-label: {e}", file=sys.stderr)
        return 1
    argv = ["versions", a.action, *([a.name] if a.name else []), "--dir", str(folder), "--reason", a.reason]
    return engine_cli(argv)


def round_parts(studies: str, conf: dict) -> tuple[ModelHost, object]:
    """The model host and the datastore a round needs, built as the app builds them (main.py) but
    without the app: a round reads final labels and writes versions; it serves nothing, hands out
    no image and records no team state, so no infer task or strategy is built; the team store is
    opened to read the labels' review states (``--conf train_on``)."""
    model_dir = APP / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    host = ModelHost(AppSettings.from_conf(conf, model_dir))
    team = Team.of(host.settings)
    store = open_datastore(host, team, studies)
    team.open(store_path(host.settings.team_db, store.root))
    return host, reviewed_labels(store, team.reviews, host.settings.train_on)


def cmd_round(a: argparse.Namespace) -> int:
    distributed.init()
    logging.basicConfig(level=logging.INFO, format=f"[rank {distributed.rank()}] %(levelname)s %(name)s: %(message)s")
    try:
        conf = dict(a.conf)
        if distributed.world() > 1 and conf.get("device", "auto").startswith("cuda:"):
            conf["device"] = "cuda"  # each process on the GPU of its LOCAL_RANK (distributed.init)
        try:
            host, datastore = round_parts(a.studies, conf)
        except ConfError as e:
            options = "\n".join(f"  --conf {k}: {v}" for k, v in HELP.items())
            print(f"segvol-label: {e}\nOptions:\n{options}", file=sys.stderr)
            return 1
        asked = {name: value for name in PARAMETERS if (value := getattr(a, name)) is not None}
        try:
            result = run_round(host, asked, datastore, AppArgs(a.studies, conf), lock_held=a.lock_held)
        except RequestError as e:
            print(f"round: {e}", file=sys.stderr)
            return 2
        if distributed.is_main():
            text = json.dumps(result, indent=1)
            if a.output:
                Path(a.output).write_text(text)
            else:
                print(text)
        distributed.barrier()  # all done before any leaves the group (a peer may still be reading)
        return 0
    finally:
        distributed.teardown()


def cmd_preannotate(a: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    dicomweb = a.studies.startswith(("http://", "https://"))
    studies = a.studies.rstrip("/") if dicomweb else str(Path(a.studies).resolve())
    if not dicomweb and not Path(studies).is_dir():
        print(f"error: --studies {a.studies}: neither a DICOMweb URL nor a folder", file=sys.stderr)
        return 2
    try:
        categories = resolve_categories([c for c in a.categories.split(",") if c.strip()])
        weights = a.weights
        if weights != "seeded":  # resolved (or downloaded) once here, not by every worker
            weights = str(find_or_download(None if weights == "hub" else weights, APP / "model").resolve())
        conf = {
            "weights": weights,
            "model_config": a.model_config,
            "zoom_in": str(not a.no_zoom_in).lower(),
            "device": a.device,
            "versions_dir": str(a.versions_dir.resolve()),
        }
        team_db = a.team_db or (None if dicomweb else Path(studies) / ".segvol" / "team.sqlite")
        job = Job(studies, categories, conf, str(a.cache.resolve()), team_db and team_db.resolve())
        job.settings()  # a bad option stops here, not in every worker
        report = preannotate(job, a.workers, a.ray_address, a.cpus)
    except (PreannotateError, ConfError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    if a.report:
        a.report.write_text("".join(json.dumps({**r, "voxels": json.loads(r["voxels"])}) + "\n" for r in report.rows))
    return 1 if report.count(FAILED) else 0


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    return {"round": cmd_round, "preannotate": cmd_preannotate, "versions": cmd_versions}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())

"""One fine-tune round from the command line, in one process or several.

    python apps/segvol/round.py --studies <folder or DICOMweb URL> [--conf k v ...] [--steps N --batch B ...]
    torchrun --nproc_per_node 2 apps/segvol/round.py --studies ... --batch 2

Why: whoever schedules rounds (cron) runs them without a server, and a round in several
processes needs an entry point torchrun can start in each. It builds the app on the studies and
--conf the server uses (the same versions folder and train.lock, so never two rounds at once),
runs the round as the server's train task does, and prints rank 0's result as JSON (or writes it
to --output). Exit status: 0 done (promoted, rejected or skipped: see "status"), 2 a refused
request, 1 anything else (a bad --conf names itself).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    from lib.trainers.decoder import SegVolDecoderTrainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", required=True, help="the datastore: a folder or a DICOMweb URL")
    parser.add_argument(
        "--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="app option, as the server's"
    )
    for name, param in SegVolDecoderTrainer.PARAMETERS.items():
        parser.add_argument(f"--{name}", type=param.kind, help=f"{param.help} (default: from --conf)")
    parser.add_argument("--output", help="write the result here (rank 0) instead of printing it")
    parser.add_argument(
        "--lock-held",
        action="store_true",
        help="the process that started this one holds train.lock (the train task with train_processes > 1)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")  # before monailabel reads it: no watcher
    from segvol.training import distributed

    args = parse(argv)
    distributed.init()
    logging.basicConfig(level=logging.INFO, format=f"[rank {distributed.rank()}] %(levelname)s %(name)s: %(message)s")
    try:
        from main import SegVolApp

        from lib.serving.validation import RequestError

        conf = dict(args.conf)
        if distributed.world() > 1 and conf.get("device", "auto").startswith("cuda:"):
            conf["device"] = "cuda"  # each process on the GPU of its LOCAL_RANK (distributed.init)
        app = SegVolApp(str(APP), args.studies, conf)
        trainer = app._trainers["segvol"]
        asked = {name: value for name in trainer.PARAMETERS if (value := getattr(args, name)) is not None}
        try:
            result = trainer.run(asked, app.datastore(), lock_held=args.lock_held)
        except RequestError as e:
            print(f"round.py: {e}", file=sys.stderr)
            return 2
        if distributed.is_main():
            text = json.dumps(result, indent=1)
            if args.output:
                Path(args.output).write_text(text)
            else:
                print(text)
        distributed.barrier()  # all done before any leaves the group (a peer may still be reading)
        return 0
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())

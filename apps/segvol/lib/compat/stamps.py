"""MONAI Label's strategy stamp (which client got an image by which strategy, and when), kept in
the datastore index's image info as MONAI Label keeps it, but written by one background thread:
writing the index (rewritten whole, fsynced, under the index's lock shared by every process) on
the request path made each annotator's Next image wait for the others' writes. Stamps for one
image collapse to the newest. An archive's series enters the index once fetched (in the
background too), so a stamp that finds no image is tried again for a while; one that still fails
is logged and dropped (the lease, in the team store, is the record that matters)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from lib.compat import MONAI_LABEL, require

require("monailabel", MONAI_LABEL, __name__)  # the stamp's form is MONAI Label's endpoints/activelearning.py's
log = logging.getLogger(__name__)
TRIES = 60  # one a second: how long a stamp waits for its image to enter the index


class StampWriter:
    def __init__(self, datastore: Callable[[], object], retry_seconds: float = 1.0) -> None:
        self.datastore = datastore
        self.retry_seconds = retry_seconds
        self._waiting: dict[str, tuple[dict, int]] = {}  # image id -> (info to merge in, tries so far)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="segvol-stamps", daemon=True).start()

    def put(self, image_id: str, info: dict) -> None:
        with self._lock:
            self._waiting[image_id] = (info, 0)
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.retry_seconds)
            self._wake.clear()
            with self._lock:
                waiting, self._waiting = self._waiting, {}
            for image_id, (info, tries) in waiting.items():
                try:
                    self.datastore().update_image_info(image_id, info)
                except Exception as e:  # not in the index yet (being fetched), a full disk
                    if tries + 1 < TRIES:
                        with self._lock:
                            self._waiting.setdefault(image_id, (info, tries + 1))  # a newer stamp wins
                    else:
                        log.warning("strategy stamp of %s not written: %s", image_id, e)

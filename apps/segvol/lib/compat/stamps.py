"""MONAI Label's strategy stamp (which client got an image by which strategy, and when), kept in
the datastore index's image info as MONAI Label keeps it, but written by one background thread:
writing the index (rewritten whole, fsynced, under the index's lock shared by every process) on
the request path made each annotator's Next image wait for the others' writes. Stamps for one
image collapse to the newest; a write that fails is logged and dropped (the lease, in the team
store, is the record that matters)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class StampWriter:
    def __init__(self, datastore: Callable[[], object]) -> None:
        self.datastore = datastore
        self._waiting: dict[str, dict] = {}  # image id -> info to merge in
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        threading.Thread(target=self._run, name="segvol-stamps", daemon=True).start()

    def put(self, image_id: str, info: dict) -> None:
        with self._lock:
            self._waiting[image_id] = info
            self._idle.clear()
        self._wake.set()

    def flush(self, timeout: float = 30) -> bool:
        """Wait until every stamp put so far is written (for a clean stop)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    if not self._waiting:
                        self._idle.set()
                        break
                    image_id, info = self._waiting.popitem()
                try:
                    self.datastore().update_image_info(image_id, info)
                except Exception as e:  # an image gone from the index meanwhile; a full disk
                    log.warning("strategy stamp of %s not written: %s", image_id, e)

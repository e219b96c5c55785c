"""The outbox: SEGs on their way to the archive.

A SEG is sent with a few tries; while the archive does not answer it waits in ``pending-seg/``
and is sent on the next save and at start-up, oldest first, so no label is lost. A SEG the
archive refuses (4xx, or a file that cannot be sent) is set aside in ``pending-seg/refused/``
with the reason beside it: ``/segvol/status`` lists it, ``POST /segvol/pending/retry`` sends it
again once the archive's settings are fixed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import requests
from filelock import FileLock, Timeout
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from pydicom.errors import InvalidDicomError

log = logging.getLogger(__name__)

RETRIES = 3
DOWN_RECENTLY = 30.0  # seconds: after the archive failed to answer, one try per upload instead of RETRIES


class ArchiveUnreachable(ConnectionError):
    """The archive did not answer (connection refused, timeout, 5xx): try again later."""


class ArchiveRefused(ValueError):
    """The archive answered and refused the SEG (4xx), or the file cannot be sent at all: sending
    it again unchanged would fail again."""


def _since(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


class Outbox:
    def __init__(self, client, folder: Path, on_stored: Callable[[], None]) -> None:
        """``client``: the archive's DICOMweb client; ``on_stored``: called once SEGs were stored
        (the SEG index is refreshed, so they count at once)."""
        self.client = client
        self.pending = folder
        self.pending.mkdir(parents=True, exist_ok=True)
        self.on_stored = on_stored
        self._down_since: float | None = None  # when an upload last found the archive not answering

    @property
    def refused(self) -> Path:
        return self.pending / "refused"

    def send(self, seg_file: Path) -> str:
        """Store one SEG file; its series UID. ArchiveRefused when the archive answers no (or the
        file cannot be read to send), ArchiveUnreachable when it does not answer after RETRIES
        tries (one try while it was found down in the last DOWN_RECENTLY seconds)."""
        recently_down = self._down_since is not None and time.monotonic() - self._down_since < DOWN_RECENTLY
        last: Exception | None = None
        for attempt in range(1 if recently_down else RETRIES):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                uid = dicom_web_upload_dcm(str(seg_file), self.client)
            except requests.HTTPError as e:
                status = e.response.status_code if e.response is not None else 0
                if 400 <= status < 500:
                    body = (e.response.text or "").strip().replace("\n", " ")[:300]
                    raise ArchiveRefused(f"the archive answered HTTP {status}: {body or e}") from e
                last = e
            except (InvalidDicomError, AttributeError, KeyError, ValueError) as e:  # not a SEG we can send
                raise ArchiveRefused(f"the file cannot be sent: {type(e).__name__}: {e}") from e
            except Exception as e:  # connection refused, timeouts, 5xx: worth another try
                last = e
            else:
                if not uid:
                    raise ArchiveRefused("the archive stored nothing (its answer names no series)")
                self._down_since = None
                return uid
        self._down_since = time.monotonic()
        raise ArchiveUnreachable(f"{type(last).__name__}: {last}")

    def deliver(self, seg_file: Path, image_id: str) -> str:
        """Send a new SEG (those waiting first); its series UID. Whatever happens, the file is
        not lost: sent and removed, queued (ArchiveUnreachable), or set aside (ArchiveRefused),
        the exception's message saying where it is kept and what comes next."""
        self.flush(wait=False)
        try:
            uid = self.send(seg_file)
        except ArchiveUnreachable as e:
            kept = self.pending / f"{image_id}-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.dcm"
            shutil.move(seg_file, kept)
            raise ArchiveUnreachable(f"{e}; it is kept in {kept} and will be sent on the next save or restart") from e
        except ArchiveRefused as e:
            kept = self.set_aside(seg_file, str(e))
            raise ArchiveRefused(
                f"{e}; it is kept in {kept}: an admin can send it again (POST /segvol/pending/retry) "
                "once the archive takes it"
            ) from e
        seg_file.unlink()
        return uid

    def set_aside(self, seg_file: Path, why: str) -> Path:
        self.refused.mkdir(exist_ok=True)
        kept = self.refused / seg_file.name
        shutil.move(seg_file, kept)
        kept.with_suffix(".reason.json").write_text(json.dumps({"reason": why, "time": time.time()}))
        log.error("archive refused SEG %s; kept aside in %s: %s", seg_file.name, kept, why)
        return kept

    def flush(self, wait: bool = True) -> list[str]:
        """Send the waiting SEGs, oldest first; returns their series UIDs. A refused one is set
        aside and the others go on; the archive not answering stops the flush. One process at a
        time (a lock beside them); with ``wait`` false, a flush running elsewhere is left to finish."""
        done = []
        lock = FileLock(str(self.pending / ".lock"))
        try:
            lock.acquire(timeout=-1 if wait else 0)
        except Timeout:
            return done
        try:
            for seg_file in sorted(self.pending.glob("*.dcm")):
                try:
                    done.append(self.send(seg_file))
                except ArchiveUnreachable as e:
                    log.warning("archive unreachable; %s and later SEGs stay pending (%s)", seg_file.name, e)
                    break
                except ArchiveRefused as e:
                    self.set_aside(seg_file, str(e))
                    continue
                seg_file.unlink(missing_ok=True)
                log.info("pending SEG %s stored in the archive", seg_file.name)
        finally:
            lock.release()
        if done:
            self.on_stored()
        return done

    def state(self) -> dict:
        """What waits to be sent, and what the archive refused (with why), for /segvol/status."""
        refused = []
        for seg_file in sorted(self.refused.glob("*.dcm")) if self.refused.exists() else []:
            try:
                reason = json.loads(seg_file.with_suffix(".reason.json").read_text())
            except (OSError, ValueError):
                reason = {"reason": "unknown", "time": seg_file.stat().st_mtime}
            refused.append(
                {"file": seg_file.name, "reason": reason.get("reason"), "since": _since(reason.get("time", 0))}
            )
        return {"waiting": len(list(self.pending.glob("*.dcm"))), "refused": refused}

    def retry_refused(self) -> list[str]:
        """Put the refused SEGs back in the queue and flush: after the archive's settings changed."""
        for seg_file in sorted(self.refused.glob("*.dcm")) if self.refused.exists() else []:
            seg_file.with_suffix(".reason.json").unlink(missing_ok=True)
            shutil.move(seg_file, self.pending / seg_file.name)
        return self.flush()

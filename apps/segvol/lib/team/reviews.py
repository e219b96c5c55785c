"""The review of every final label, durable in the team store and shared by every process.

A final save is ``submitted``; a reviewer ``approved`` or ``returned`` it (with a comment for the
whole label and per segment); the annotator's next final save of the image ``resubmitted`` the
returned one and is ``submitted`` again. A reviewer may instead save a corrected version
(``review_of``): the reviewed save is ``corrected``, the reviewer's own ``approved``, with the
voxels added and removed per segment against the annotator's label. A final save of the image by
anyone else before review leaves the earlier one ``superseded``: only the newest is reviewed.

Double reading (lib/team/double_reading.py): each reading is ``waiting`` until the other
annotator's is in; both are then ``submitted`` as a pair (``pair``), and the reviewer adjudicates
by saving one of them again, as it is or corrected (``review_of`` either): both become
``adjudicated`` and the reviewer's save, the image's final label, ``approved``.

Every action is one conditional update: two reviewers acting on one label at once, one wins and
the other is told who did what first (ReviewConflict, HTTP 409); nothing is lost.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable

from lib.team.store import TeamStore
from segvol.postgres import DatabaseUnavailable

log = logging.getLogger(__name__)

WAITING, SUBMITTED, APPROVED, RETURNED = "waiting", "submitted", "approved", "returned"
RESUBMITTED, CORRECTED, ADJUDICATED, SUPERSEDED = "resubmitted", "corrected", "adjudicated", "superseded"
OPEN = (WAITING, SUBMITTED, RETURNED)  # states a newer save of the image ends
ACTIONS = ("approve", "return")
MAX_COMMENT = 4000  # characters of a comment, whole label or one segment
MAX_SEGMENT_COMMENTS = 255


class ReviewError(ValueError):
    """A review request that cannot be carried out; ``status`` is its HTTP status."""

    status = 400

    def __init__(self, message: str, status: int = 400, state: str | None = None, by: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.state = state
        self.by = by

    def as_detail(self) -> dict | str:
        return str(self) if self.status != 409 else {"message": str(self), "state": self.state, "by": self.by}


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def checked_comments(comment: object, segments: object) -> tuple[str, dict[str, str]]:
    """The whole label's comment and the per-segment ones, bounded (ReviewError naming the bad one)."""
    if comment is None:
        comment = ""
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise ReviewError(f"comment must be text of at most {MAX_COMMENT} characters")
    segments = segments or {}
    if not isinstance(segments, dict) or len(segments) > MAX_SEGMENT_COMMENTS:
        raise ReviewError(f"segments must map segment names to comments (at most {MAX_SEGMENT_COMMENTS})")
    for name, text in segments.items():
        if not (0 < len(name) <= 256 and isinstance(text, str) and len(text) <= MAX_COMMENT):
            raise ReviewError(f"the comment on segment {name[:40]!r} must be text of at most {MAX_COMMENT} characters")
    return comment.strip(), {k: v.strip() for k, v in segments.items() if v.strip()}


def slicer_meta(review: dict) -> dict:
    status = {APPROVED: "approved", RETURNED: "flagged"}.get(review["state"], "")
    return {
        "status": status,
        "approvedBy": review["reviewer"] if status == "approved" else "",
        "level": "",
        "comment": review["comment"] or "",
        "editTime": int(time.mktime(time.strptime(review["reviewed"] or review["time"], "%Y-%m-%dT%H:%M:%S%z"))),
        "state": review["state"],
    }


class Reviews:
    def __init__(self, store: TeamStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        try:
            self._adopt_earlier_saves()
        except DatabaseUnavailable as e:  # the server starts without its database; adopted at the next start
            log.warning("reviews: earlier saves not adopted now: %s", e)

    def _adopt_earlier_saves(self) -> None:
        """Each image's newest final label saved before reviews were recorded (a store from an
        earlier version) is submitted for review, once: it reaches the queue rather than never."""
        with self.store.connect(write=True) as db:
            db.execute(
                "INSERT INTO reviews (save, image, annotator, submitted, state, reading) "
                "SELECT id, image, client, time, 'submitted', 0 FROM saves WHERE id IN "
                "(SELECT MAX(id) FROM saves WHERE tag = 'final' GROUP BY image) "
                "AND image NOT IN (SELECT image FROM reviews)"
            )

    # ------------------------------------------------------------------ a final save arrives
    def submitted(
        self, save: int, image: str, annotator: str, leased: float | None, reading: bool, review_of: int | None
    ) -> dict:
        """Record a final save's review: a reviewer's correction or adjudication (``review_of``,
        checked by ``check_correction`` before the save) is approved and ends the reviewed label(s);
        a double ``reading`` waits for or pairs with the other annotator's; anything else is
        submitted and ends the image's open labels (a returned one of the same annotator is resubmitted)."""
        now = self.clock()
        with self.store.connect(write=True) as db:
            if review_of is not None:
                return self._corrected(db, save, image, annotator, leased, review_of, now)
            state, pair, resubmits = SUBMITTED, None, None
            for row in db.execute(f"SELECT * FROM reviews WHERE image = ? AND state IN {OPEN!r}", (image,)).fetchall():
                mine = row["annotator"] == annotator
                if reading and not mine and row["reading"]:
                    pair = pair or row["save"]  # the other annotator's reading: paired, not superseded
                    continue
                ended = RESUBMITTED if mine and row["state"] == RETURNED else SUPERSEDED
                if ended == RESUBMITTED:
                    resubmits = row["save"]
                self._set(db, row["save"], image, ended, annotator, now, {"by_save": save}, by_save=save)
            if reading:
                state = SUBMITTED if pair else WAITING
                if pair:
                    db.execute(
                        "UPDATE reviews SET pair = ?, state = CASE state WHEN ? THEN ? ELSE state END WHERE save = ?",
                        (save, WAITING, SUBMITTED, pair),
                    )
            db.execute(
                "INSERT INTO reviews (save, image, annotator, submitted, leased, state, reading, pair, resubmits) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (save, image, annotator, now, leased, state, int(reading), pair, resubmits),
            )
            self._event(db, save, image, "submitted", annotator, now, {"state": state, "pair": pair})
        return {"state": state, "pair": pair, "resubmits": resubmits}

    def _corrected(
        self, db: sqlite3.Connection, save: int, image: str, reviewer: str, leased: float | None, of: int, now: float
    ) -> dict:
        row = db.execute("SELECT * FROM reviews WHERE save = ?", (of,)).fetchone()
        ended_state = ADJUDICATED if row is not None and row["pair"] else CORRECTED
        if row is None or row["state"] != SUBMITTED:  # another reviewer acted while this was saved
            state = SUBMITTED
            ended = []
        else:
            state = APPROVED
            ended = [of] + ([row["pair"]] if row["pair"] else [])
        for done in ended:
            self._set(db, done, image, ended_state, reviewer, now, {"by_save": save}, by_save=save)
        db.execute(
            "INSERT INTO reviews (save, image, annotator, submitted, leased, state, reading, reviewer, reviewed) "
            "VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
            (save, image, reviewer, now, leased, state, reviewer if ended else None, now if ended else None),
        )
        self._event(db, save, image, "correction" if ended else "submitted", reviewer, now, {"review_of": of})
        if not ended:
            return {"state": state, "lost_to": self._row(row) if row is not None else None}
        return {"state": state, "review_of": of, "ended": ended_state}

    def record_changes(self, save: int, changes: dict) -> None:
        """A correction's voxels added and removed per segment, against the label it corrected."""
        with self.store.connect(write=True) as db:
            db.execute("UPDATE reviews SET changes = ? WHERE save = ?", (json.dumps(changes), save))

    # ------------------------------------------------------------------ a reviewer acts
    def check_correction(self, of: int, reviewer: str, self_review: bool) -> dict:
        """Before a reviewer's corrected version is saved: ``of`` exists, is open for review and not
        the reviewer's own (unless ``self_review``). Returns the reviewed save's review."""
        with self.store.connect() as db:
            row = self._open(db, of, reviewer, self_review)
        return self._row(row)

    def act(self, save: int, reviewer: str, action: str, comment: object, segments: object, self_review: bool) -> dict:
        """Approve or return ``save`` (a return needs a comment, for the label or a segment)."""
        if action not in ACTIONS:
            raise ReviewError(f"action must be one of {', '.join(ACTIONS)} or adopt, got {action!r}")
        text, per_segment = checked_comments(comment, segments)
        if action == "return" and not (text or per_segment):
            raise ReviewError("a returned label needs a comment saying what to fix (comment or segments)")
        now = self.clock()
        state = APPROVED if action == "approve" else RETURNED
        with self.store.connect(write=True) as db:
            row = self._open(db, save, reviewer, self_review)
            if row["pair"]:
                raise ReviewError(
                    f"version {save} is one of a double reading: adjudicate it (action adopt, or save a corrected "
                    "version with review_of) so that one label becomes the image's final label",
                    409,
                    SUBMITTED,
                )
            detail = {"comment": text, "segments": per_segment}
            self._set(db, save, row["image"], state, reviewer, now, detail, comment=text, segments=per_segment)
            return self._row(db.execute("SELECT * FROM reviews WHERE save = ?", (save,)).fetchone())

    def _open(self, db: sqlite3.Connection, save: int, reviewer: str, self_review: bool) -> sqlite3.Row:
        """The review row of ``save`` when a reviewer may act on it now, else ReviewError (404, 403, 409)."""
        row = db.execute("SELECT * FROM reviews WHERE save = ?", (save,)).fetchone()
        if row is None:
            raise ReviewError(
                f"no final label version {save}: review the version its save answered (GET /segvol/review/queue)", 404
            )
        if row["annotator"] == reviewer and not self_review:
            raise ReviewError(
                f"version {save} is {reviewer}'s own label: another reviewer reviews it (--conf self_review)", 403
            )
        if row["state"] == SUBMITTED:
            return row
        if row["state"] == SUPERSEDED:
            newer = db.execute("SELECT annotator, submitted FROM reviews WHERE save = ?", (row["by_save"],)).fetchone()
            who = f" ({newer['annotator']}, {_iso(newer['submitted'])})" if newer else ""
            raise ReviewError(
                f"version {save} was superseded by version {row['by_save']}{who}: review that one", 409, SUPERSEDED
            )
        if row["state"] == WAITING:
            raise ReviewError(f"version {save} is a double reading whose second reading is not in yet", 409, WAITING)
        by = row["reviewer"] or row["annotator"]
        raise ReviewError(
            f"version {save} was already {row['state']} by {by} at {_iso(row['reviewed'] or row['submitted'])}",
            409,
            row["state"],
            by,
        )

    def _set(self, db, save: int, image: str, state: str, actor: str, now: float, detail: dict, **columns) -> None:
        """One state change and its event. A reviewer's change is conditional on the label still being
        submitted: the loser of two reviewers acting at once is told the winner's action."""
        reviewer = actor if state in (APPROVED, RETURNED, CORRECTED, ADJUDICATED) else None
        sql = (
            "UPDATE reviews SET state = ?, reviewer = COALESCE(?, reviewer), "
            "reviewed = CASE WHEN CAST(? AS TEXT) IS NULL THEN reviewed ELSE ? END, "
            "comment = COALESCE(?, comment), segment_comments = COALESCE(?, segment_comments), "
            "by_save = COALESCE(?, by_save) WHERE save = ?"
        )
        segments = columns.get("segments")
        args = (
            state,
            reviewer,
            reviewer,
            now,
            columns.get("comment"),
            json.dumps(segments) if segments is not None else None,
            columns.get("by_save"),
            save,
        )
        if state in (APPROVED, RETURNED):
            sql += " AND state = 'submitted'"
        if db.execute(sql, args).rowcount == 0:
            self._open(db, save, actor, True)  # raises, naming who acted first
            raise ReviewError(f"version {save} changed meanwhile: look again", 409)
        self._event(db, save, image, state, actor, now, detail)

    @staticmethod
    def _event(db, save: int, image: str, action: str, actor: str, now: float, detail: dict) -> None:
        db.execute(
            "INSERT INTO review_events (save, image, action, actor, time, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (save, image, action, actor, now, json.dumps(detail)),
        )

    # ------------------------------------------------------------------ what people see
    @staticmethod
    def _row(row: sqlite3.Row) -> dict:
        return {
            "version": row["save"],
            "image": row["image"],
            "annotator": row["annotator"],
            "state": row["state"],
            "time": _iso(row["submitted"]),
            "reviewer": row["reviewer"],
            "reviewed": _iso(row["reviewed"]),
            "comment": row["comment"],
            "segments": json.loads(row["segment_comments"] or "{}"),
            "double_read": bool(row["reading"]),
            "pair": row["pair"],
            "resubmits": row["resubmits"],
            "by_save": row["by_save"],
            "changes": json.loads(row["changes"]) if row["changes"] else None,
        }

    def of(self, save: int) -> dict | None:
        with self.store.connect() as db:
            row = db.execute("SELECT * FROM reviews WHERE save = ?", (save,)).fetchone()
        return None if row is None else self._row(row)

    def pending(self) -> list[dict]:
        """Every label awaiting review, oldest first; a double-read pair once (its earlier reading)."""
        with self.store.connect() as db:
            rows = db.execute(
                "SELECT * FROM reviews WHERE state = 'submitted' AND (pair IS NULL OR save < pair) ORDER BY submitted"
            ).fetchall()
        now = self.clock()
        return [dict(self._row(r), minutes_waiting=round((now - r["submitted"]) / 60, 1)) for r in rows]

    def returned_to(self, annotator: str) -> list[dict]:
        """The annotator's labels returned and not yet resubmitted, oldest first."""
        with self.store.connect() as db:
            rows = db.execute(
                "SELECT * FROM reviews WHERE state = 'returned' AND annotator = ? ORDER BY reviewed", (annotator,)
            ).fetchall()
        return [self._row(r) for r in rows]

    def of_image(self, image: str) -> tuple[list[dict], list[dict]]:
        """The image's reviews, newest first, and its review events, oldest first."""
        with self.store.connect() as db:
            rows = db.execute("SELECT * FROM reviews WHERE image = ? ORDER BY save DESC", (image,)).fetchall()
            events = db.execute("SELECT * FROM review_events WHERE image = ? ORDER BY id", (image,)).fetchall()
        return [self._row(r) for r in rows], [
            {
                "version": e["save"],
                "action": e["action"],
                "by": e["actor"],
                "time": _iso(e["time"]),
                **json.loads(e["detail"]),
            }
            for e in events
        ]

    def slicer_meta(self, save: int) -> dict:
        """The review as 3D Slicer's reviewer module (MONAILabelReviewer) reads it from a label's info:
        ``segmentationMeta`` {status approved / flagged / "", approvedBy, level, comment, editTime}."""
        review = self.of(save)
        return slicer_meta(review) if review else {}

    def newest_by_image(self) -> dict[str, dict]:
        """Image -> the review of its newest final save (one query, for the datastore listing)."""
        with self.store.connect() as db:
            rows = db.execute(
                "SELECT * FROM reviews WHERE save IN (SELECT MAX(save) FROM reviews GROUP BY image)"
            ).fetchall()
        return {r["image"]: self._row(r) for r in rows}

    def of_label(self, image: str, key: str) -> dict | None:
        """The review of a datastore's final label: its SEG series (``key`` on an archive) or, in a
        folder, the image's newest final save. None when no save of it is on record."""
        with self.store.connect() as db:
            row = db.execute(
                "SELECT r.* FROM reviews r JOIN saves s ON s.id = r.save WHERE s.seg_series = ? AND s.image = ?",
                (key, image),
            ).fetchone()
            if row is None:
                row = db.execute(
                    "SELECT r.* FROM reviews r JOIN saves s ON s.id = r.save WHERE s.image = ? AND s.tag = 'final' "
                    "AND s.seg_series IS NULL ORDER BY s.id DESC LIMIT 1",
                    (image,),
                ).fetchone()
        return None if row is None else self._row(row)

    def waiting_series(self, client: str) -> set[str]:
        """The SEG series of the waiting double readings of annotators other than ``client``."""
        with self.store.connect() as db:
            rows = db.execute(
                "SELECT s.seg_series FROM reviews r JOIN saves s ON s.id = r.save WHERE r.state = 'waiting' "
                "AND r.annotator != ? AND s.seg_series IS NOT NULL",
                (client,),
            ).fetchall()
        return {r["seg_series"] for r in rows}

    def waiting_readings(self) -> list[sqlite3.Row]:
        """The double readings whose second reading is not in: (image, annotator, save)."""
        with self.store.connect() as db:
            return db.execute("SELECT image, annotator, save FROM reviews WHERE state = 'waiting'").fetchall()

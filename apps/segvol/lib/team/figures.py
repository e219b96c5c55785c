"""The team's figures, from the team store alone: per annotator and per category.

Per annotator: final labels saved, approved by a reviewer, returned (each return counts), the
median minutes from taking the image (its lease) to saving it, and the mean Dice with the other
reader over their double readings. Per category: labels of it reviewed, returned (a return with
per-segment comments counts only the segments it names), the return rate, and the mean Dice over
double-read pairs. Figures are computed on request: a team's store holds thousands of rows, not millions.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from statistics import mean, median

from lib.team.store import TeamStore

REVIEWED = ("approved", "returned", "corrected", "adjudicated")


def _mean(values: list[float]) -> float | None:
    return round(mean(values), 4) if values else None


def team_figures(store: TeamStore, agreements: list[dict]) -> dict:
    """``agreements``: lib/team/double_reading.py's measured pairs."""
    with store.connect() as db:
        saves = {
            r["id"]: (r["client"], [s["name"] for s in json.loads(r["segments"])])
            for r in db.execute("SELECT id, client, segments FROM saves WHERE tag = 'final'")
        }
        reviews = db.execute("SELECT save, annotator, state, reviewer, leased, submitted FROM reviews").fetchall()
        events = db.execute(
            "SELECT save, action, detail FROM review_events WHERE action IN ('approved', 'returned', 'corrected', "
            "'adjudicated')"
        ).fetchall()
    people: dict[str, dict] = defaultdict(lambda: {"saved": 0, "approved": 0, "returned": 0, "minutes": [], "dice": []})
    for client, _ in saves.values():
        people[client]["saved"] += 1
    for r in reviews:
        if r["state"] == "approved" and r["reviewer"] != r["annotator"]:
            people[r["annotator"]]["approved"] += 1
        if r["leased"] is not None and r["submitted"] >= r["leased"]:
            people[r["annotator"]]["minutes"].append((r["submitted"] - r["leased"]) / 60)
    categories: dict[str, dict] = defaultdict(lambda: {"reviewed": 0, "returned": 0, "dice": [], "pairs": 0})
    for e in events:
        client, names = saves.get(e["save"], (None, []))
        for name in names:
            categories[name]["reviewed"] += 1
        if e["action"] == "returned":
            if client is not None:
                people[client]["returned"] += 1
            named = set(json.loads(e["detail"]).get("segments") or {})
            for name in named & set(names) or names:
                categories[name]["returned"] += 1
    for pair in agreements:
        readers = [saves.get(pair["a"], (None,))[0], saves.get(pair["b"], (None,))[0]]
        scores = [f["dice"] for f in pair["figures"] if f["dice"] is not None]
        for client in readers:
            if client is not None and scores:
                people[client]["dice"].append(mean(scores))
        for f in pair["figures"]:
            categories[f["name"]]["pairs"] += 1
            if f["dice"] is not None:
                categories[f["name"]]["dice"].append(f["dice"])
    return {
        "annotators": [
            {
                "client": client,
                "saved": p["saved"],
                "approved": p["approved"],
                "returned": p["returned"],
                "median_minutes_to_save": round(median(p["minutes"]), 1) if p["minutes"] else None,
                "agreement_dice": _mean(p["dice"]),
                "double_readings": len(p["dice"]),
            }
            for client, p in sorted(people.items())
        ],
        "categories": [
            {
                "name": name,
                "reviewed": c["reviewed"],
                "returned": c["returned"],
                "return_rate": round(c["returned"] / c["reviewed"], 3) if c["reviewed"] else None,
                "agreement_dice": _mean(c["dice"]),
                "pairs": c["pairs"],
            }
            for name, c in sorted(categories.items())
        ],
    }


def as_csv(figures: dict) -> str:
    """Two tables in one file, each under a line naming it (spreadsheets open it as is)."""
    out = io.StringIO()
    writer = csv.writer(out)
    for section in ("annotators", "categories"):
        rows = figures[section]
        writer.writerow([section])
        if rows:
            writer.writerow(list(rows[0]))
            writer.writerows([["" if v is None else v for v in row.values()] for row in rows])
        writer.writerow([])
    return out.getvalue()

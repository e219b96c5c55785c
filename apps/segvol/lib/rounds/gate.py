"""The promotion gate: whether a round's version is served.

A version is served only if held-out Dice rose by more than ``promote_min_gain`` and the replay
Dice (what the model answers for other categories, against the previous version's answers) stays
above 1 - ``promote_replay_margin``, so the model does not forget. Held-out Dice of a category the
round never trained measures nothing the round did: such a round reports no Dice and is rejected.
A round whose views leave nothing to train on or nothing to measure ends before training, as a
skipped round with its reason, never with an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

from segvol.training.finetune import View

NO_SHARED_CATEGORY = "held-out images share no category with the training images: Dice measures nothing"


def nothing_to_learn(train_views: list[View], val_views: list[View], train: int, held: int, skipped: int) -> str:
    """Why the round cannot train or measure once the empty views are left out ("" if it can):
    then it ends with this reason, as a skipped round, never with an exception."""
    side = None
    if not train_views:
        side = f"the {train} training image(s) give no view with a target"
    elif not val_views:
        side = f"the {held} held-out image(s) give no view with a target to measure the gain on"
    if side is None:
        return ""
    return f"nothing to learn: {side} ({skipped} view(s) skipped, listed in skipped_views)"


def shares_category(trained: list[str], val_views: list[View]) -> bool:
    """Whether held-out Dice measures a category the round trained."""
    return bool(set(trained) & {v.category for v in val_views})


@dataclass(frozen=True)
class Verdict:
    """The gate's answer. ``before`` and ``after`` are None when held-out Dice measured nothing."""

    before: float | None
    after: float | None
    replay_dice: float
    reasons: tuple[str, ...]  # why not promoted; empty: promoted

    @property
    def promoted(self) -> bool:
        return not self.reasons

    @property
    def status(self) -> str:
        return "promoted" if self.promoted else "rejected: " + "; ".join(self.reasons)

    def dice_meta(self) -> dict:
        """The Dice entries of the version's metadata: none with a warning when nothing was
        measured (a Dice that measures nothing would read as a result)."""
        if self.before is None:
            return {"warning": NO_SHARED_CATEGORY}
        return {"val_dice_before": self.before, "val_dice_after": self.after}

    def activation_reason(self) -> str:
        return f"held-out Dice {self.before:.3f} -> {self.after:.3f}, replay {self.replay_dice:.3f}"


@dataclass(frozen=True)
class Gate:
    min_gain: float  # promote_min_gain
    replay_margin: float  # promote_replay_margin

    @classmethod
    def of(cls, settings) -> Gate:
        return cls(settings.promote_min_gain, settings.promote_replay_margin)

    def judge(self, before: float | None, after: float | None, replay_dice: float) -> Verdict:
        """``before`` / ``after``: held-out Dice, None when no held-out category was trained."""
        if before is None or after is None:
            why = [NO_SHARED_CATEGORY]
        elif after > before + self.min_gain:
            why = []
        else:
            why = [f"held-out Dice {before:.3f} -> {after:.3f} did not rise"]
        if not replay_dice >= 1 - self.replay_margin:  # a NaN fails too
            why.append(f"replay Dice {replay_dice:.3f} below {1 - self.replay_margin:.2f}")
        return Verdict(before, after, replay_dice, tuple(why))

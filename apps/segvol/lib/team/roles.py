"""Who reviews. With MONAI Label's authentication on, the roles in the user's token: its reviewer
or admin role makes a reviewer, its admin role an admin. Without it, ``--conf reviewers`` names
the reviewers: names, not proofs (anyone may send any client id; docs/security.md). Everyone who
may annotate is an annotator; a reviewer is one too."""

from __future__ import annotations

from dataclasses import dataclass

from monailabel.config import settings

from lib.team.identity import current_roles


@dataclass(frozen=True)
class Roles:
    reviewers: tuple[str, ...]  # --conf reviewers, without authentication
    self_review: bool

    def of(self, client: str) -> list[str]:
        """The asking client's roles: annotator, and reviewer and admin where they are."""
        if settings.MONAI_LABEL_AUTH_ENABLE:
            token = set(current_roles.get())
            reviewer = bool(token & {settings.MONAI_LABEL_AUTH_ROLE_REVIEWER, settings.MONAI_LABEL_AUTH_ROLE_ADMIN})
            admin = settings.MONAI_LABEL_AUTH_ROLE_ADMIN in token
        else:
            reviewer, admin = client in self.reviewers, False
        return ["annotator"] + ["reviewer"] * reviewer + ["admin"] * admin

    def reviewer(self, client: str) -> bool:
        return "reviewer" in self.of(client)

    def sees_figures(self, client: str) -> bool:
        return bool({"reviewer", "admin"} & set(self.of(client)))

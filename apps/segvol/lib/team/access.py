"""Who may do what. With MONAI Label's authentication on, the roles in the user's token decide
(the role names are MONAI Label's settings, MONAI_LABEL_AUTH_ROLE_*). Without it nobody is proven
to be anyone: reading, prompting and saving labels stay open (that is the annotation loop), and
what changes the datastore beyond labels (adding or deleting images, deleting labels, rewriting a
label's recorded info) is off unless ``--conf datastore_changes true`` turns it on.
docs/security.md has this table for people.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from monailabel.config import settings


class Action(Enum):
    READ = "read the datastore, results and status"
    ANNOTATE = "prompt SegVol, take the next image, save labels"
    CHANGE_DATASTORE = "add or delete images, delete labels, rewrite a label's recorded info"
    MANAGE = "start or stop rounds, run batch inference, retry SEGs the archive refused"


def _roles(*names: str) -> tuple[str, ...]:
    return tuple(getattr(settings, f"MONAI_LABEL_AUTH_ROLE_{n}") for n in names)


# with authentication on: any one of these roles allows the action
ROLES = {
    Action.READ: _roles("USER", "ANNOTATOR", "REVIEWER", "ADMIN"),
    Action.ANNOTATE: _roles("USER", "ANNOTATOR", "REVIEWER", "ADMIN"),
    Action.CHANGE_DATASTORE: _roles("ADMIN"),
    Action.MANAGE: _roles("ADMIN"),
}


class Forbidden(PermissionError):
    """The asking user may not do this; the message says what would allow it."""


@dataclass(frozen=True)
class Policy:
    auth: bool
    datastore_changes: bool  # --conf datastore_changes: CHANGE_DATASTORE without authentication

    def check(self, action: Action, roles: list[str] | tuple[str, ...]) -> None:
        if self.auth:
            needed = ROLES[action]
            if not set(needed) & set(roles):
                raise Forbidden(f"to {action.value} you need one of the roles {', '.join(needed)}")
        elif action is Action.CHANGE_DATASTORE and not self.datastore_changes:
            raise Forbidden(
                f"without sign-in nobody may {action.value}: turn on authentication (an admin may), "
                "or start the server with --conf datastore_changes true"
            )

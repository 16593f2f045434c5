"""Alert statuses: the one list the store, the review index, the APIs and the page agree on.

An alert is *open* while its rule fires, whatever people did with it; it is *closed* once the rule stopped
firing (DESIGN.md, alert lifecycle):

* open: ``active`` (new or escalated), ``acknowledged``, ``accepted`` (the recommendation was taken),
  ``overridden`` (with a reason), ``snoozed`` (until a time; escalation wakes it early);
* closed: ``resolved`` (the resolve condition was met, or resolved by hand), ``retracted`` (its source data was
  entered in error or deleted), ``expired`` (its evidence aged out of the look-back), ``withdrawn`` (the rule
  stopped firing for another reason, e.g. a corrected result or a stopped order).

*To do* is what still needs a pharmacist: ``active`` and ``acknowledged`` (the worklist's default view).
"""

from __future__ import annotations

OPEN = ("active", "acknowledged", "accepted", "overridden", "snoozed")
CLOSED = ("resolved", "retracted", "expired", "withdrawn")
STATUSES = (*OPEN, *CLOSED)
TODO = ("active", "acknowledged")

#: status groups the worklist filters on, beside each single status
GROUPS: dict[str, tuple[str, ...]] = {"todo": TODO, "open": OPEN, "closed": CLOSED, "all": STATUSES}


def groups_of(status: str) -> list[str]:
    """The groups (``todo``, ``open``, ``closed``, ``all``) a status belongs to; an unknown status is in
    ``all`` only, so a status a newer writer introduces still shows up somewhere."""
    return [name for name, members in GROUPS.items() if status in members or name == "all"]

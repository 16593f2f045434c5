"""What the apply script receives per decision: the explanation only where the script can read it."""

from __future__ import annotations

import pytest

from rules.engine import Decision
from workers.store import _decision_body


def _decision(outcome: str, resolves: bool = False) -> Decision:
    decision = Decision(
        rule_id="r",
        rule_version="1.0.0",
        rule_status="active",
        patient="p",
        as_of="2024-05-01T00:00:00Z",
        outcome=outcome,  # type: ignore[arg-type]
        resolves=resolves,
        card={"summary": "s"} if outcome == "fires" else None,
    )
    decision.explanation = f"{outcome} because"
    return decision


@pytest.mark.parametrize(
    ("outcome", "resolves", "retracted", "sent"),
    [
        ("fires", False, False, True),  # opened / updated history entries
        ("not-fires", True, False, True),  # resolves an open alert
        ("not-fires", False, True, True),  # may retract an open alert that cites a retracted fact
        ("not-fires", False, False, False),  # the script does nothing with it
        ("indeterminate", False, True, False),  # never closes an alert
    ],
)
def test_explanation_is_sent_when_the_script_may_use_it(outcome: str, resolves: bool, retracted: bool, sent: bool):
    body = _decision_body(_decision(outcome, resolves), retracted)
    assert ("explanation" in body) is sent
    if sent:
        assert body["explanation"] == f"{outcome} because"
    if outcome == "fires":
        assert body["alert"]["explanation"] == "fires because"
    assert body["outcome"] == outcome and body["resolves"] is resolves

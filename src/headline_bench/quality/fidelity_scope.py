"""Which techniques get a fidelity measure: decided from params alone. dvc.yaml runs the fidelity stage for score.family
members only; the report gives every other technique (the reference, lossless ones, another model) its n/a from here,
and a member that gets none (random weights) writes it without importing torch or reading baseline's distributions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from headline_bench.models.ref import model_source

if TYPE_CHECKING:
    from headline_bench.settings import Params


def not_measured(name: str, params: Params) -> str | None:
    """Why a technique gets no fidelity measure (the reference itself, lossless, another model, random weights), or None."""
    entry = params.entry(name)
    if name == "baseline":
        return "the reference"
    if entry.reference:
        return f"lossless (reference {entry.reference}): judged by the token-id check, not by a distance"
    if getattr(params.base, entry.role) != params.base.model:  # the model resolve() gives the technique
        return "n/a: another model (its next-token distributions are not baseline's to approximate)"
    if model_source(params.base.model).get("random"):
        return "n/a: random weights"
    return None


def not_measured_record(name: str, params: Params) -> dict[str, Any] | None:
    """fidelity.json of a technique with no fidelity measure, or None when it gets one."""
    reason = not_measured(name, params)
    return None if reason is None else {"technique": name, "reference": "baseline", "not_measured": reason}

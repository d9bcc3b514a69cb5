"""Planning: the selected graph → ordered steps, a memory plan (one arena by lifetime) and
optional side streams."""

from kiln.plan.planner import make_plan

__all__ = ["make_plan"]

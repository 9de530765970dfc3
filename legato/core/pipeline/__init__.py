"""Pipeline-parallel training (after PipeDream): layer profiles, the partition planner, the
schedule IR with its generators and static verifier, and the simulator."""

from legato.core.pipeline.ir import Action, ActionKind, Schedule, ScheduleError, format_grid
from legato.core.pipeline.planner import MODES, OBJECTIVES, Plan, PlanError, PlanStage, plan
from legato.core.pipeline.profile import LayerNode, LayerProfile, ProfileError
from legato.core.pipeline.schedules import (
    SCHEDULES,
    add_communication,
    get_schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    pipedream,
    pipedream_2bw,
)
from legato.core.pipeline.simulate import Link, SimResult, Span, StageCost
from legato.core.pipeline.simulate import simulate as simulate
from legato.core.pipeline.topology import Level, Topology, parse_bandwidth, parse_bytes
from legato.core.pipeline.verify import DeadlockError, VerifyReport, verify

__all__ = [
    "MODES", "OBJECTIVES", "SCHEDULES", "Action", "ActionKind", "DeadlockError", "LayerNode",
    "LayerProfile", "Level", "Link", "Plan", "PlanError", "PlanStage", "ProfileError",
    "Schedule", "ScheduleError", "SimResult", "Span", "StageCost", "Topology", "VerifyReport",
    "add_communication", "format_grid", "get_schedule", "gpipe", "interleaved_1f1b",
    "one_f_one_b", "parse_bandwidth", "parse_bytes", "pipedream", "pipedream_2bw", "plan",
    "simulate", "verify",
]

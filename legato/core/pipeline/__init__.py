"""Pipeline-parallel training (after PipeDream): layer profiles (issue 4; planner, schedules,
simulator and runtime are still to come)."""

from legato.core.pipeline.profile import LayerNode, LayerProfile, ProfileError

__all__ = ["LayerNode", "LayerProfile", "ProfileError"]

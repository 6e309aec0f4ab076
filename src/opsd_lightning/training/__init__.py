"""The training module and the parts it is built from: samplers, episodes, teacher contexts."""

from opsd_lightning.training.episodes import Episodes
from opsd_lightning.training.module import OnPolicyModule
from opsd_lightning.training.samplers import (
    GroupSampler,
    ReferenceSampler,
    RolloutSource,
    Sampler,
    SingleSampler,
)
from opsd_lightning.training.teacher_contexts import (
    ContextTools,
    OwnRolloutContext,
    ReasonFirstContext,
    ReferenceContext,
    StudentContext,
    TeacherContext,
    TeacherPrompts,
    reference_solutions,
)

__all__ = [
    "ContextTools",
    "Episodes",
    "GroupSampler",
    "OnPolicyModule",
    "OwnRolloutContext",
    "ReasonFirstContext",
    "ReferenceContext",
    "ReferenceSampler",
    "RolloutSource",
    "Sampler",
    "SingleSampler",
    "StudentContext",
    "TeacherContext",
    "TeacherPrompts",
    "reference_solutions",
]

"""The vocabulary between the layers: frozen dataclasses and the one table per set of choices.

Nothing here imports torch: these objects cross the boundary between `studio/` and `engines/`, are written into
PNG metadata and project files as JSON, and are validated once, when they are built. The UI, the CLI, the engines
and the benchmarks import them from here; the modules beside this file group them by subject.
"""

from engines.types.checks import Cancelled, InputError, check_keys, unknown_subject
from engines.types.generation import (
    GUIDANCE_ALIASES,
    GUIDANCE_MODES,
    Box,
    GenerateRequest,
    GenerateResult,
    GuidanceConfig,
    GuidanceMode,
    Layout,
    ProgressCallback,
    Region,
    StepProgress,
    guidance_mode,
)
from engines.types.models import ModelSpec
from engines.types.references import REFERENCE_SWITCHES, START_MODES, ReferenceConfig, reference_switch
from engines.types.relations import (
    EXAMPLES_FILE,
    LORA_SCALE_LIMIT,
    MAX_EXAMPLES,
    MAX_KEYPOINTS,
    MAX_LORAS,
    MIN_EXAMPLES,
    RELATION_NAME_RULE,
    LoraRef,
    RelationInfo,
    RelationTrainRequest,
    check_relation_name,
)
from engines.types.subjects import (
    FAMILY_LR,
    REGISTER_PRESETS,
    SUBJECT_NAME_RULE,
    RegisterPreset,
    RegisterRequest,
    SubjectInfo,
    check_subject_name,
)
from engines.types.tables import DEVICES, DTYPES, FAMILIES, LIMITS, OFFLOADS, QUANTIZATIONS, SCHEDULERS, Limits, Sampler

__all__ = [
    "EXAMPLES_FILE",
    "LORA_SCALE_LIMIT",
    "MAX_EXAMPLES",
    "MAX_KEYPOINTS",
    "MAX_LORAS",
    "MIN_EXAMPLES",
    "RELATION_NAME_RULE",
    "LoraRef",
    "RelationInfo",
    "RelationTrainRequest",
    "check_relation_name",
    "REFERENCE_SWITCHES",
    "START_MODES",
    "ReferenceConfig",
    "Box",
    "Cancelled",
    "DEVICES",
    "DTYPES",
    "FAMILIES",
    "FAMILY_LR",
    "GUIDANCE_ALIASES",
    "GUIDANCE_MODES",
    "GenerateRequest",
    "GenerateResult",
    "GuidanceConfig",
    "GuidanceMode",
    "InputError",
    "LIMITS",
    "Layout",
    "Limits",
    "ModelSpec",
    "OFFLOADS",
    "ProgressCallback",
    "QUANTIZATIONS",
    "REGISTER_PRESETS",
    "Region",
    "RegisterPreset",
    "RegisterRequest",
    "SCHEDULERS",
    "SUBJECT_NAME_RULE",
    "Sampler",
    "StepProgress",
    "SubjectInfo",
    "check_keys",
    "check_subject_name",
    "guidance_mode",
    "reference_switch",
    "unknown_subject",
]

"""Teachers (ASE calculators) and the labelled datasets they produce.

Importing this package is cheap: ASE and the foundation-model packages are imported only when used.
"""

from .calculators import TEACHERS, TeacherUnavailableError, make_calculator, teacher_available
from .generate import build_default_dataset, default_cache_dir, generate_alloy_structures
from .labelling import LabelFileMismatchError, NonFiniteLabelError, label_structures, read_labelled
from .sampling import build_distillation_dataset, deduplicate, sample_structures, seed_structures

__all__ = [
    "TEACHERS",
    "LabelFileMismatchError",
    "NonFiniteLabelError",
    "TeacherUnavailableError",
    "build_default_dataset",
    "build_distillation_dataset",
    "deduplicate",
    "default_cache_dir",
    "generate_alloy_structures",
    "label_structures",
    "make_calculator",
    "read_labelled",
    "sample_structures",
    "seed_structures",
    "teacher_available",
]

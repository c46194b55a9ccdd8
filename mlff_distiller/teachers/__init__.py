"""Teachers (ASE calculators) and the labelled datasets they produce.

Importing this package is cheap: ASE and the foundation-model packages are imported only when used.
Modules: ``calculators`` (teachers by name), ``structures`` (structure builders), ``cache`` (the on-disk
dataset cache), ``labelling`` (resumable labelling), ``hessian`` (Hessian rows), ``generate`` (the built-in
Cu-Au set), ``sampling`` (distillation sets and their typed recipe, :class:`SamplingConfig`).
"""

from .cache import default_cache_dir
from .calculators import TEACHERS, TeacherUnavailableError, make_calculator, teacher_available
from .generate import build_default_dataset, generate_alloy_structures
from .labelling import LabelFileMismatchError, NonFiniteLabelError, label_structures, read_labelled
from .sampling import SamplingConfig, build_distillation_dataset, deduplicate, sample_structures, seed_structures

__all__ = [
    "TEACHERS",
    "LabelFileMismatchError",
    "NonFiniteLabelError",
    "SamplingConfig",
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

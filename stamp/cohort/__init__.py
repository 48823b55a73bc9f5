"""A cohort: clinical + slide tables → patients with their feature files and targets.

Modules: :mod:`~stamp.cohort.patients` assembles the cohort (:func:`load_cohort`, :class:`CohortData`,
:class:`Patient`, the drop reasons); :mod:`~stamp.cohort.tables` reads the tables as text (NA tokens,
survival status, file-name-safe labels); :mod:`~stamp.cohort.feature_files` is the feature-file side
(h5 probing, :func:`detect_feature_type`, the feature path of a ``FILENAME``, feature_info).
This package exports the names the stages use.
"""

from stamp.cohort.feature_files import FeatureType, detect_feature_type
from stamp.cohort.patients import (
    ALL_MISSING,
    BAD_STATUS,
    BAD_TIME,
    EMPTY,
    MIN_CLASS_PATIENTS,
    MISSING_GT,
    MISSING_STATUS,
    MISSING_TIME,
    NO_FEATURES,
    NO_SLIDES,
    NON_NUMERIC,
    NOT_IN_CATEGORIES,
    NOT_IN_CLINI,
    UNREADABLE,
    CohortData,
    Patient,
    Task,
    load_cohort,
)
from stamp.cohort.tables import NA_TOKENS, is_na, parse_status, read_table, safe_name

__all__ = [
    "ALL_MISSING",
    "BAD_STATUS",
    "BAD_TIME",
    "EMPTY",
    "MIN_CLASS_PATIENTS",
    "MISSING_GT",
    "MISSING_STATUS",
    "MISSING_TIME",
    "NA_TOKENS",
    "NON_NUMERIC",
    "NOT_IN_CATEGORIES",
    "NOT_IN_CLINI",
    "NO_FEATURES",
    "NO_SLIDES",
    "UNREADABLE",
    "CohortData",
    "FeatureType",
    "Patient",
    "Task",
    "detect_feature_type",
    "is_na",
    "load_cohort",
    "parse_status",
    "read_table",
    "safe_name",
]

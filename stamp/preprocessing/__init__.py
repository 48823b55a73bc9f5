"""The ``preprocess`` stage: slides → tissue tiles → tile features in STAMP h5 files, one slide at a time.

Modules: :mod:`~stamp.preprocessing.params` (what decides a slide's features: :class:`PreprocessParams`
from a config section, the code version); :mod:`~stamp.preprocessing.outputs` (the feature folder, each
slide's h5 path and QC files, and whether outputs there may be reused or a cached result served);
:mod:`~stamp.preprocessing.extract` (one slide start to finish: :func:`process_slide`,
:func:`extract_slide`). This package exports the names the stage's task and flow use.
"""

from stamp.preprocessing.extract import (
    SlideFailed,
    SlideReport,
    TileEncoder,
    extract_slide,
    process_slide,
    up_to_date_report,
)
from stamp.preprocessing.outputs import (
    check_slide_outputs,
    colliding_outputs,
    feature_dir,
    h5_path_for,
    output_paths,
    serve_cached,
    slide_provenance,
)
from stamp.preprocessing.params import PreprocessParams, params_from_config, preprocessing_code_hash

__all__ = [
    "PreprocessParams",
    "SlideFailed",
    "SlideReport",
    "TileEncoder",
    "check_slide_outputs",
    "colliding_outputs",
    "extract_slide",
    "feature_dir",
    "h5_path_for",
    "output_paths",
    "params_from_config",
    "preprocessing_code_hash",
    "process_slide",
    "serve_cached",
    "slide_provenance",
    "up_to_date_report",
]

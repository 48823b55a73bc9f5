"""Run ``preprocess`` in its own process for concurrency tests: ``python -m tests.preprocess_runner CFG.json SLOW``.

``SLOW`` seconds of sleep are added per slide (test-only, by wrapping the stage's call of
``extract_slide``) so that a test can kill the run, or start a second one, mid-way.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import stamp.preprocessing.extract as stage_module
from stamp.config_models import PreprocessingConfig
from stamp_flows.preprocess import run_preprocess


def main() -> None:
    cfg = PreprocessingConfig.model_validate(json.loads(Path(sys.argv[1]).read_text()))
    slow = float(sys.argv[2])
    real = stage_module.extract_slide

    def slowed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(slow)
        return real(*args, **kwargs)

    stage_module.extract_slide = slowed  # type: ignore[assignment]
    result = run_preprocess(cfg, task_concurrency=2)
    print("RESULT " + json.dumps({"counts": result["counts"], "rows": result["rows"]}))


if __name__ == "__main__":
    main()

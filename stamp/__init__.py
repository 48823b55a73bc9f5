"""STAMP, orchestrated: a STAMP-compatible computational-pathology pipeline.

The ``stamp`` package holds pure stage logic and never imports Prefect; the
Prefect tasks and flows live in ``stamp_tasks`` (folder ``tasks/``) and
``stamp_flows`` (folder ``flows/``).
"""

__version__ = "0.1.0"

# STAMP release whose config schema and file formats we follow.
STAMP_COMPAT_VERSION = "2.5.0"

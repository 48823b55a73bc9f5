"""Tile-encoder families: one module per family, each declaring its encoders with
:func:`stamp.encoders.registry.register`.

:mod:`stamp.encoders.registry` imports every module here (names starting with ``_`` excepted),
so a new family is a new file in this folder and nothing else. Import torch, timm or vendor
packages only inside the hooks: listing the registry stays torch-free.
"""

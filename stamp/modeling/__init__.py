"""Modeling: patients' feature bags, MIL models, training, cross-validation and deployment.

Submodules are imported where used (``stamp.modeling.data``, ``stamp.modeling.models``, ...), so
importing this package stays cheap and pulls in no torch.
"""

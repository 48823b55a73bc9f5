"""``stamp statistics``: metrics with 95 % CIs and plots from ``patient-preds*.csv`` files."""

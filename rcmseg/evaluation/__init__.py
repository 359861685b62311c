"""Evaluation as in the MED-Net paper: metrics on labelled pixels, splits, cross-validation,
studies.

Modules: :mod:`~rcmseg.evaluation.splits` (patient-wise stratified folds, group splits),
:mod:`~rcmseg.evaluation.evaluate` (segment a dataset and score it),
:mod:`~rcmseg.evaluation.cv` (one model per fold), :mod:`~rcmseg.evaluation.study` (variants
compared on shared folds), :mod:`~rcmseg.evaluation.report` (tables and images).
Submodules are imported on use so that importing the package stays cheap.
"""

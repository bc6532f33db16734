"""Evaluation: the paper's retrieval metrics over modality pairs (:mod:`.metrics`, on the kernels
of :mod:`sdml_ext.ops`), evaluating a bundle on a dataset split (:mod:`.evaluation`) and drawing
its curves (:mod:`.plots`)."""

"""Stage 04, notebooks/04_evaluate.ipynb: every model on the eval split, answers generated and scored (the scoring
rules are tunebook/metrics.py, shared with 01 and 05), the teacher as a judge of long answers."""

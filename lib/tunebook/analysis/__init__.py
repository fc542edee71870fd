"""Stage 05, notebooks/05_error_analysis.ipynb: why answers are wrong (categories, fixed / broken, confusion
matrices), report.html, the answer browser, the model cards, and runs compared side by side."""

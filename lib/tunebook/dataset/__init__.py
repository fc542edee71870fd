"""Stage 01, notebooks/01_build_dataset.ipynb: the training and eval rows, from labelled files (question/passages/answers
or a chat format), from documents through a teacher, or written by a teacher for each label; checked, split, rendered
as chat prompts and saved."""

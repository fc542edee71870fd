"""The run folder `outputs/<run_name>/` and how a stage runs in it: the manifest and each stage's status and outputs,
stage keys, executing a stage's notebook, several processes, files written safely, row files, the experiment tracker."""

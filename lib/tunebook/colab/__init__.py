"""Google Colab: the notebooks' set-up cell and what it installs (and what a stage installs when its params ask for
more), and the one setting that names the repository (the clone, the badges, the model cards' link)."""

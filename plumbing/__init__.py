"""The plumbing every lesson and script shares but none teaches: the AG News files (agnews.py),
run folders (runfolders.py), checked flags (flags.py), a run's life around loop.train() (run.py)
and the classifier a run's config describes (classifiers.py). common.py, at the top, is the rest."""

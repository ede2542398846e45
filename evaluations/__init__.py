"""ADM evaluation suite: FID, sFID, Inception Score, precision and recall.

``evaluator.py`` is the command line and the original evaluator's Python
surface, ``metrics.py`` the maths on feature arrays, ``inception.py`` the
feature network, ``npz_io.py`` the streaming reader of batch files,
``activations.py`` the activations cache and ``make_reference.py`` the command
that makes a reference batch for any image folder or npz.
"""

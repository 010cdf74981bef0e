"""Structured channel pruning: capture → score → decide → plan → compensate → apply → report.

``prune.py`` runs the phases in that order; each phase has its module (capture, graph: the channel
rules, criteria, decide, apply, compensate, sizes, report), the searches over the ratio are in
``search.py``, measured layer widths in ``widths.py``, checkpoints in ``checkpoint.py``.
"""

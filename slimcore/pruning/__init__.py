"""Structured channel pruning: capture → score → decide → plan → compensate → apply → report.

``prune.py`` runs the phases in that order (``prune_with_options``); each phase has its module:
capture (the model as an ATen-level graph), graph (the channel rules), criteria (scores), decide,
sizes (sizes the model's code computes), apply (plans and the gather), compensate, report.
``options.py`` holds the options, ``search.py`` the searches over the ratio, ``latency_select.py``
the latency-aware choice of channels, ``widths.py`` measured layer widths and the latency table,
``checkpoint.py`` save/load, ``modules.py`` the modules the pruner puts into models.
"""

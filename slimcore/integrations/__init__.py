"""Integrations with other training frameworks. Each submodule imports its framework lazily, so
``import slimcore`` never needs it:

* :mod:`slimcore.integrations.ultralytics`: network slimming of ultralytics YOLO models through
  ultralytics' own trainer (``pip install "slimcore[yolo]"``).
"""

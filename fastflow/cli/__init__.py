"""The command line: one module per command (``python -m fastflow <command>``), the
shared pieces in ``common`` and the training loop in ``loop``."""

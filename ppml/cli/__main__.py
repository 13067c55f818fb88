"""``python -m ppml.cli``: the same as the ``ppml`` command."""

from ppml.cli import app

app()

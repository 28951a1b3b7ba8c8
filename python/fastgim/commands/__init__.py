"""Sub-commands of the ``fastgim`` CLI (see :mod:`fastgim.cli`)."""

"""``python -m palimpsest``: the same as the ``palimpsest`` command."""
from palimpsest.cli import main

main()

"""``python -m unialign ...`` is the same as the ``unialign`` command."""
from .cli import main

main()

"""The ``unialign`` command: Typer only, one module per command group, no library code. Every command
parses its options, calls the library (``unialign`` / ``unialign_train`` / ``unialign_serve``) and
prints; library modules are imported inside the command functions, so ``unialign --help`` is fast."""

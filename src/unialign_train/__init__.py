"""unialign_train: everything that makes an aligned model (``pip install unialign[train]``).

Stages, each reading what the one before it wrote: :mod:`.data` (records of named modalities, sources,
the split protocol) -> :mod:`.features` (the feature store) -> :mod:`.select` and :mod:`.curate` ->
:mod:`.align` (the loop, losses, closed-form aligners, recipes) -> :mod:`.evaluate` -> :mod:`.report`
and :mod:`.export`; :mod:`.config` validates a job and :mod:`.pipeline` runs it. A stage never imports a
later one (checked by ``lint-imports``, see pyproject.toml).
"""
__all__: list[str] = []

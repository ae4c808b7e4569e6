"""The app layer: the ``prodrep`` command (:mod:`prodrep.cli`), the whole pipeline
(:mod:`prodrep.pipeline`) and the evaluation command (:mod:`prodrep.evaluate`).

Layers import downwards only (enforced by the import-linter contracts in ``pyproject.toml``):
``prodrep`` -> ``spark_jobs`` | ``ray_train`` (independent of each other) -> ``common``.
"""

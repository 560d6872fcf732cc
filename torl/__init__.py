"""torl's pure logic: no Ray, no running engine, unit-tested in milliseconds (tests/unit/test_imports.py).

Subpackages: ``rl`` (the RL math), ``rollout`` (one trajectory through the tool loop), ``data`` (problems, tasks,
prompts, the sampler), ``prepare`` (training-data preparation), ``models`` (model building), ``serving`` (the
OpenAI-compatible surface), ``sandbox`` (isolated execution of model code), ``infra`` (storage, checkpoints, logs,
preflight). ``config`` is the typed configuration every part reads; ``evaluation`` the eval job's bookkeeping.
"""

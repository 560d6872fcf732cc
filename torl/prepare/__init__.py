"""Training-data preparation (``jobs/prepare_data.py``): raw problem sources in, one veRL/ToRL parquet file out.

ToRL's data recipe (docs/torl-behaviour.md ("Training data")): pool problems, drop those without a single
verifiable final answer, then select with LIMR. Modules: ``config`` (the job's typed settings), ``text`` (question
normalisation and n-grams), ``checks`` (per-problem filters), ``similarity`` (near duplicates, decontamination),
``limr`` (learning-impact scores), ``balance`` (difficulty from measured pass rates), ``verl_format`` (the output
schema), ``summary`` (counts and distributions), ``pipeline`` (the passes in order, with their ledger).
"""

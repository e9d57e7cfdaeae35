"""Evaluation for the LLaVA-1.5 / PIIP protocol (importable and unit-tested; ``python -m piip_llava.evaluation``).

Modules: ``cli`` (the one skeleton and flag vocabulary), ``tasks`` (the registry: one module per benchmark),
``task`` (what a benchmark provides), ``runner`` (batched, sharded, resumable generation loop), ``provenance``
(what produced an answers file), ``backends`` (in-process engine or an OpenAI-compatible server), ``io`` (the answers
and question readers), ``report`` (results tables, paper row, chart), ``eval_all``, ``answer_processing`` (EvalAI
normaliser). Nothing is imported here, so importing the package stays cheap.
"""

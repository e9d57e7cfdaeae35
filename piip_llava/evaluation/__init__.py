"""Benchmark logic for the LLaVA-1.5 / PIIP evaluation protocol (importable and unit-tested; CLIs live in eval/).

Modules: ``runner`` (shared batched, sharded, resumable generation loop), ``textvqa``, ``mmbench``, ``benchmarks``
(POPE, GQA, ScienceQA-IMG, SEED-I, VQAv2, MM-Vet), ``answer_processing`` (EvalAI normaliser), ``report``
(paper-row table and chart), ``cli`` (flags shared by the eval CLIs). Nothing is imported here, so importing
the package stays cheap.
"""

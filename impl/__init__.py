"""The reference lab for LLM engineering: one module per technique, tests against the production library,
benchmarks beside it. `python -m impl --help` lists the runnable entry points."""

"""What the tests, scripts/ and benchmarks/ share: micro checkpoints and texts (``testkit.micro``) and the
GPU check's one-trial sweep with its read-back (``testkit.sweeps``).

Top-level, beside tests/, scripts/ and benchmarks/, because it builds on every package (quailora's list of
tested architectures up to the orchestrator's plan and MLflow read-back): no package may import it, and it
ships in none (pyproject.toml's package list leaves it out).
"""

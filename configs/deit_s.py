"""Loads deit_jax/configs/deit_s.py, the packaged config (its docstring: commands, results).

Kept here so that `--config=configs/deit_s.py[:variant]` works from the repository root.
"""

from deit_jax.configs.deit_s import __doc__, get_config  # noqa: F401, A001

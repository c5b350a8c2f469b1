"""Loads deit_jax/configs/deit_b.py, the packaged config (its docstring: commands, results).

Kept here so that `--config=configs/deit_b.py[:variant]` works from the repository root.
"""

from deit_jax.configs.deit_b import __doc__, get_config  # noqa: F401, A001

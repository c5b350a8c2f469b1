"""Loads deit_jax/configs/deit3.py, the packaged config (its docstring: commands, results).

Kept here so that `--config=configs/deit3.py[:variant]` works from the repository root.
"""

from deit_jax.configs.deit3 import __doc__, get_config  # noqa: F401, A001

"""Loads deit_jax/configs/study.py, the packaged config (its docstring: commands, results).

Kept here so that `--config=configs/study.py[:variant]` works from the repository root.
"""

from deit_jax.configs.study import CELLS, ROLES, __doc__, get_config  # noqa: F401, A001

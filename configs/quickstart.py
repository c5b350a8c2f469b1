"""Loads deit_jax/configs/quickstart.py, the packaged config (its docstring: commands, results).

Kept here so that `--config=configs/quickstart.py[:variant]` works from the repository root.
"""

from deit_jax.configs.quickstart import __doc__, get_config  # noqa: F401, A001

"""The packaged configs, one module per experiment family with ``get_config(arg=None)``.

The top-level ``configs/`` directory of the repository holds thin files that load these, so
``--config=configs/deit_ti.py`` works from the repository root; the command lines also find
``configs/NAME.py`` here when no such file exists where they run (``deit_jax.cli``).
"""

"""The packaged recipe deit_jax/configs/common.py, for the config files of this directory."""

from deit_jax.configs.common import (  # noqa: F401
    DISTILLED,
    PLAIN,
    apply_variant,
    base_config,
    deit_config,
    parse_arg,
    smoke,
)

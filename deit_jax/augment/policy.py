"""The recipe's constants and timm's RandAugment op tables and spec parser (no TensorFlow).

Shared by the host ops (TensorFlow, ``tf.data``) and the device ops (JAX, in the train step),
so both read the same names, orders and fill colour.
"""

import math
import re

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's RandAugment fill: the mean colour as 8-bit values, min(255, round(255 * mean)).
IMAGENET_MEAN_UINT8 = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)

LEVEL_DENOM = 10.0  # timm: magnitude M maps to level M / 10 of each op's range

# timm's `_RAND_INCREASING_TRANSFORMS` and `_RAND_TRANSFORMS`, in timm's order.
RAND_INCREASING_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
    'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
    'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel',
)
RAND_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel',
)

# timm's geometric ops (an affine inverse map each); the rest are pixel ops.
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def parse_rand_augment(spec: str) -> dict:
    """timm RandAugment config string -> `rand_augment` kwargs.

    'rand-m9-mstd0.5-inc1' -> dict(magnitude=9.0, num_ops=2, magnitude_std=0.5,
    increasing=True, prob=0.5). Sections: m (magnitude), n (ops), p (prob), mstd (std,
    > 100 means uniform), inc (0/1); defaults are timm's (m10, n2, p0.5, mstd0, inc0).
    """
    sections = spec.split('-')
    if sections[0] != 'rand':
        raise ValueError(f"RandAugment spec must start with 'rand', got {spec!r}")
    kwargs = dict(magnitude=10.0, num_ops=2, magnitude_std=0.0, increasing=False, prob=0.5)
    parsers = {
        'm': ('magnitude', float),
        'n': ('num_ops', int),
        'p': ('prob', float),
        'mstd': ('magnitude_std', lambda v: math.inf if float(v) > 100 else float(v)),
        'inc': ('increasing', lambda v: bool(int(v))),
    }
    for section in sections[1:]:
        match = re.fullmatch(r'([a-z]+)(\d.*)', section)
        if match is None or match.group(1) not in parsers:
            raise ValueError(
                f'Unsupported RandAugment section {section!r} in {spec!r}; '
                f'expected one of {sorted(parsers)} followed by a number')
        key, convert = parsers[match.group(1)]
        try:
            kwargs[key] = convert(match.group(2))
        except ValueError as error:
            raise ValueError(f'Bad value in RandAugment section {section!r} of {spec!r}') \
                from error
    return kwargs


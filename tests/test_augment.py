"""The recipe's RandAugment on real PIL images: every op at its extreme magnitudes, deterministically."""
import random

import numpy as np
import pytest
from PIL import Image

from spach.train.augment import augment_ops
from spach.train.config import TrainConfig
from spach.train.data import pil_train_transform

RECIPE = TrainConfig().aa  # rand-m9-mstd0.5-inc1, the paper's


def image(mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    shape = (24, 20, 3) if mode == "RGB" else (24, 20)
    return Image.fromarray(rng.integers(1, 256, shape).astype(np.uint8), mode)


@pytest.mark.parametrize("policy", [RECIPE, RECIPE.replace("-inc1", ""), RECIPE.replace("-inc1", "-inc0")])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_op_at_extreme_magnitudes(policy, mode):
    chans = 3 if mode == "RGB" else 1
    cfg = TrainConfig(aa=policy)
    ops = augment_ops(pil_train_transform(cfg, chans, 16, (0.5,) * chans, (0.5,) * chans))
    assert len(ops) == 15, ops  # the whole policy is reached
    # 0 and 10: the ends of the range the mstd draw is clipped to (timm's _LEVEL_DENOM), whatever it draws
    for magnitude in (0.0, 9.0, 10.0):
        for op in ops:
            op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0
            random.seed(0)
            out = op(image(mode))
            assert out.mode == mode and out.size == (20, 24), (op.name, magnitude)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_posterize_to_zero_bits_is_black(mode):
    (op,) = [o for o in augment_ops(pil_train_transform(TrainConfig(), 3, 16, (0.5,) * 3, (0.5,) * 3))
             if o.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0  # 4 - int(10 / 10 * 4) = 0 bits
    assert np.asarray(op(image(mode))).max() == 0
    op.magnitude = 0.0  # 4 bits: the low 4 bits cleared, the rest kept
    out = np.asarray(op(image(mode)))
    assert (out & 15).max() == 0 and out.max() > 0

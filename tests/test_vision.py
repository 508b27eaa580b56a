import numpy as np
import pytest
import torch

from deltaserve_zoo import vision
from deltaserve_zoo.spec import VisionSpec


def test_splits_partition_the_data():
    sizes = {s: len(vision.digits("plain", s)[1]) for s in ("train", "calib", "test")}
    assert sum(sizes.values()) == 1797
    assert sizes["train"] > sizes["test"] > sizes["calib"]


@pytest.mark.parametrize("task", sorted(vision.TRANSFORMS))
def test_transforms_keep_range_and_are_deterministic(task):
    x1, y1 = vision.digits(task, "test")
    x2, y2 = vision.digits(task, "test")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape[1] == 64 and float(x1.min()) >= 0.0 and float(x1.max()) <= 1.0


def test_transforms_do_what_they_say():
    plain = vision.digits("plain", "test")[0].reshape(-1, 8, 8).numpy()
    rot90 = vision.digits("rot90", "test")[0].reshape(-1, 8, 8).numpy()
    flip = vision.digits("flip_lr", "test")[0].reshape(-1, 8, 8).numpy()
    inv = vision.digits("invert", "test")[0].reshape(-1, 8, 8).numpy()
    np.testing.assert_allclose(np.rot90(rot90, -1, axes=(1, 2)), plain, atol=1e-6)
    np.testing.assert_allclose(flip[:, :, ::-1], plain, atol=1e-6)
    np.testing.assert_allclose(1 - inv, plain, atol=1e-6)


def test_expert_learns_its_task_and_keeps_its_head():
    spec = VisionSpec(hidden_size=32, base_epochs=10, probe_epochs=20, finetune_epochs=10)
    base = vision.train_base(spec, seed=0)
    expert = vision.train_expert(base, "rot180", spec, seed=1)
    base_acc = vision.accuracy(base.body, expert.head, "rot180")
    expert_acc = vision.accuracy(expert.body, expert.head, "rot180")
    assert expert_acc > base_acc + 0.1
    # the body changed, the plain task's features were not left intact
    assert not torch.equal(base.body[0].weight, expert.body[0].weight)


def test_unknown_task():
    with pytest.raises(KeyError, match="known"):
        vision.digits("rot45", "test")

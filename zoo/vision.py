"""Vision suite on scikit-learn's bundled digits: the 8-task-ViT setup in miniature.

A small MLP *body* is trained on plain digits. Each task is a transformed
version of the data (rotation, flip, inversion, noise) with its own
classification *head*: the head is a few-shot linear probe (``probe_shots``
examples per class) fitted on the frozen base body — it plays the role of
CLIP's fixed zero-shot head: cheap, task-specific and mediocre — then the body
alone is fine-tuned with that head frozen. So every task vector lives in the body, and
the heads are task-specific parameters carried alongside. A model is scored on
task t as (its body, t's head) on t's transformed test split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from deltaserve.experts.registry import Registry
from deltaserve_zoo.spec import VisionSpec
from deltaserve_zoo.tasks import Split

IMAGE_SIDE = 8
N_CLASSES = 10
_SPLIT_FRACTIONS = {"train": (0.0, 0.6), "calib": (0.6, 0.75), "test": (0.75, 1.0)}

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]
TRANSFORMS: Registry[Transform] = Registry("vision task")


def transform(name: str):
    """Register ``(images [n,8,8] in [0,1], rng) -> images`` as a vision task."""

    def register(fn: Transform) -> Transform:
        return TRANSFORMS.add(name, fn)

    return register


@transform("plain")
def _plain(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x


@transform("rot90")
def _rot90(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.rot90(x, 1, axes=(1, 2))


@transform("rot180")
def _rot180(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.rot90(x, 2, axes=(1, 2))


@transform("flip_lr")
def _flip_lr(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x[:, :, ::-1]


@transform("flip_ud")
def _flip_ud(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x[:, ::-1, :]


@transform("invert")
def _invert(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - x


@transform("noise")
def _noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + rng.normal(0.0, 0.2, size=x.shape), 0.0, 1.0)


def digits(task: str, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, 64] (float32) and labels [n] of one task's split."""
    transform_fn = TRANSFORMS[task]  # a miss lists the known tasks
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    lo, hi = _SPLIT_FRACTIONS[split]
    idx = order[int(lo * len(order)) : int(hi * len(order))]
    images = data.images[idx] / 16.0
    rng = np.random.default_rng(_stable_seed(task, split))
    x = transform_fn(images, rng).reshape(len(idx), -1).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(data.target[idx]).long()


def _stable_seed(task: str, split: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{task}/{split}".encode()).digest()[:8], "little")


class DigitsMLP(nn.Module):
    """body: 64 -> h -> h (ReLU); head: h -> 10."""

    def __init__(self, hidden_size: int):
        super().__init__()
        side = IMAGE_SIDE * IMAGE_SIDE
        self.body = nn.Sequential(
            nn.Linear(side, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size), nn.ReLU()
        )
        self.head = nn.Linear(hidden_size, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _few_shot(x: torch.Tensor, y: torch.Tensor, shots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``shots`` examples of every class (the split is already shuffled)."""
    idx = torch.cat([torch.nonzero(y == c).flatten()[:shots] for c in range(N_CLASSES)])
    return x[idx], y[idx]


def _fit(
    model: DigitsMLP, params, task: str, epochs: int, spec: VisionSpec, seed: int, shots: int = 0
) -> None:
    x, y = digits(task, "train")
    if shots:
        x, y = _few_shot(x, y, shots)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=spec.lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), spec.batch_size):
            idx = perm[start : start + spec.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()


def train_base(spec: VisionSpec, seed: int) -> DigitsMLP:
    torch.manual_seed(seed)
    model = DigitsMLP(spec.hidden_size)
    _fit(model, model.parameters(), "plain", spec.base_epochs, spec, seed)
    return model


def train_expert(base: DigitsMLP, task: str, spec: VisionSpec, seed: int,
                 finetune_lr: float | None = None) -> DigitsMLP:
    """Few-shot probe a head for ``task`` on the frozen base body, then fine-tune the body
    (at ``finetune_lr`` when given, else ``spec.lr``; the quality probes vary it)."""
    torch.manual_seed(seed)
    model = DigitsMLP(spec.hidden_size)
    model.body.load_state_dict(base.body.state_dict())
    _fit(model, model.head.parameters(), task, spec.probe_epochs, spec, seed, spec.probe_shots)
    body_spec = spec if finetune_lr is None else spec.model_copy(update={"lr": finetune_lr})
    _fit(model, model.body.parameters(), task, spec.finetune_epochs, body_spec, seed + 1)
    return model


@torch.inference_mode()
def accuracy(body: nn.Module, head: nn.Module, task: str, split: Split = "test") -> float:
    x, y = digits(task, split)
    return (head(body(x)).argmax(-1) == y).float().mean().item()

"""Shared fixtures: the micro zoo is built once per machine (cached by spec hash)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests share one cached micro zoo; the build is skipped when its spec is unchanged.
MICRO_ZOO = Path(os.environ.get("DELTASERVE_TEST_ZOO", REPO / ".cache" / "zoo" / "micro"))


@pytest.fixture(scope="session")
def micro_zoo():
    from experts.zoo.build import ZooBuilder
    from experts.zoo.spec import preset

    builder = ZooBuilder(preset("micro"), MICRO_ZOO)
    builder.build(workers=1)
    return builder

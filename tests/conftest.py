import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def thumos_json():
    path = SHARED / "data" / "thumos14.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: tests expect ../shared beside the checkout")
    return path

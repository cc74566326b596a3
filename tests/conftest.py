"""Fixtures shared by several test modules (plain helpers live in tests/helpers.py)."""

import pytest


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The analysis commands must refuse their input before any model is loaded."""
    from verl_anchor.analysis import common

    monkeypatch.setattr(common, "load_model", lambda args: pytest.fail("the model was loaded"))

"""Shared fixtures: one small real target per session, trained once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_target(tmp_path_factory):
    """The default digits target (MLP, default epochs), trained once per test session."""
    from purifier.models.target import train_target

    return train_target("digits", tmp_path_factory.mktemp("targets") / "digits", seed=0, progress=False)

"""Pytest fixtures for tests/evaluation (builders live in eval_fixtures.py)."""
import pytest

from eval_fixtures import FakeEngine, build_mmbench_fixture, build_textvqa_fixture


@pytest.fixture
def textvqa_fixture(tmp_path):
    return build_textvqa_fixture(tmp_path)


@pytest.fixture
def mmbench_fixture(tmp_path):
    return build_mmbench_fixture(tmp_path)


@pytest.fixture
def fake_engine_cls():
    return FakeEngine

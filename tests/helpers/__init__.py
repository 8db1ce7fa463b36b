"""Test helpers shared by the test modules (import as ``from helpers.fake_data import ...``;
``tests/`` is on ``sys.path`` because it holds ``conftest.py``)."""

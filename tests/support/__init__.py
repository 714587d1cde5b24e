"""Helpers shared by the test modules: process environments, mirror rigs, raw NBD clients,
pure-Python reference models (``support.reference``).

Test modules import them one way only: ``from tests.support.X import ...``; a test module
never imports another test module or ``conftest``.
"""

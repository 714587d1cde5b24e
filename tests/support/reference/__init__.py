"""Tiny pure-Python reference models of the compiled modules, used only by tests.

Each model is written for obviousness, not speed: property tests run the
compiled module and its model on the same random inputs and compare.
"""

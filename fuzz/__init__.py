"""Fuzz harnesses of every parser that reads what a peer or a disk hands us (see README.md)."""

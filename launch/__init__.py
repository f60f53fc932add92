"""The training entry point, ``python launch/train.py`` (a package only so that tests can import it)."""

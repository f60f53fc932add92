"""Command-line tools (``python tools/<name>.py``). A package only so that tests can import a tool's
``main()`` (pytest puts the repository root on ``sys.path``: ``pythonpath`` in ``pyproject.toml``)."""

"""Models a user can train with ``--model`` (``distnn.models.gpt:build``) or pass to fit."""

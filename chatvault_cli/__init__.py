"""The ``chatvault`` operator CLI."""

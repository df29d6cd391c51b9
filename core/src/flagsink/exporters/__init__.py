"""Built-in exporters: ``file`` and ``log``, registered through entry points like any plugin."""

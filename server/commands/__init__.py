"""The CLI commands that use the zoo: ``zoo`` (build, data), ``eval`` and ``demo``."""

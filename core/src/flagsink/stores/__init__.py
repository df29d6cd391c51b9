"""Flag stores shipped with flagsink core."""

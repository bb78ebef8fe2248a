"""Serving: the built-in inference engine and the adapter agent that runs beside an engine."""

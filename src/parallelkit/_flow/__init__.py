"""Flow: async steps wired by parameter name, run on the graph engine (``flow``)."""

"""kubetune's control plane: the typed API, manifest rendering, the kopf operator and the CLI."""

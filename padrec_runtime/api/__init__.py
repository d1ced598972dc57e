"""The service API: Recommender, its settings, adaptive speculation and the `padrec recommend` command."""

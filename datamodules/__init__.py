"""LightningDataModules: the synthetic benchmark (embedded default) and LLaVA-format data."""

"""LightningModules: training the tiny base LVLM, and the frozen-base compensation module (RCP, ACCM)."""

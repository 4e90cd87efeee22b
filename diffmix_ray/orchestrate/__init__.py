"""Orchestration over the stages: `demo`, `report`, the paper recipes and `run RECIPE`. It calls the
stages' public entry points; no stage (and nothing in runtime/) imports it
(tests/test_layering.py checks it)."""

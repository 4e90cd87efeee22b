"""Runtime plumbing the stages import: starting or joining Ray (local_ray), custom metrics, the Ray
job helpers and run announcement (jobs), staging a model on every node (stage).

Dependencies run one way: stages import runtime; runtime imports no stage and no orchestration
(tests/test_layering.py checks it)."""

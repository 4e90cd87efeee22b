"""Runtime plumbing the stages import: starting or joining Ray and the GPU default (local_ray, asking
the autoscaler in autoscaler), which node a process runs on and GPU nodes without CUDA (nodes), local
paths every node must see (shared_paths), custom metrics, the Ray job helpers and run announcement
(jobs), staging a model on every node (stage).

Dependencies run one way: stages import runtime; runtime imports no stage and no orchestration
(tests/test_layering.py checks it)."""

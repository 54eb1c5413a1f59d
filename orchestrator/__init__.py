"""orchestrator: the control plane (config, planner, Ray controller, CLI, Kubernetes).

Never imports torch at module import time, so ``mla plan`` starts fast where torch is absent."""

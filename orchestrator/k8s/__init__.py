"""Kubernetes / KubeRay integration: render RayJobs from job configs, submit and follow them.

- :mod:`.render`: job config + planner bounds -> ConfigMap and RayJob dicts (pure).
- :mod:`.validate`: offline strict validation (KubeRay v1.7.0 CRDs, Kubernetes schemas).
- :mod:`.status`: RayJob, pods and events -> plain-words status lines (pure).
- :mod:`.client`: create / observe / delete with the official ``kubernetes`` client.
- :mod:`orchestrator.cli_k8s`: ``mla k8s render|submit|status|delete|validate``.

Nothing here imports torch; ``kubernetes`` is imported lazily.
"""

"""The contract between the control plane and the workers (torch-free, import-light).

Both ``orchestrator`` (planner, controller, k8s renderer, tune) and ``workers`` (the Ray Train
data plane) import this package, and it imports neither of them: its modules depend only on the
standard library, pydantic and the job schema (:mod:`orchestrator.config`, which is itself
pure pydantic). It lives inside the ``orchestrator`` namespace rather than as a fifth top-level
package so that the installed names stay the three rooms of the architecture, and because the
job schema it wraps is the control plane's public input.

Modules (one concept each):

* :mod:`~orchestrator.contract.layout` -- :class:`Layout` (dp/tp/pp, ZeRO stage, micro-batch,
  rank arithmetic), the rules every side checks (what the workers run, ZeRO-3 resume, tp vs
  heads, recompute choices);
* :mod:`~orchestrator.contract.deepspeed_config` -- the DeepSpeed JSON built from job + layout;
* :mod:`~orchestrator.contract.run_plan` -- :class:`RunPlan`, the frozen object the driver
  hands to every worker;
* :mod:`~orchestrator.contract.privacy` -- :class:`PrivacyPlan`, the DP-SGD settings of a run;
* :mod:`~orchestrator.contract.checkpoints` -- the checkpoint folder naming both sides read;
* :mod:`~orchestrator.contract.errors` -- the user-error hierarchy;
* :mod:`~orchestrator.contract.io` -- atomic file writes;
* :mod:`~orchestrator.contract.jsonl` -- JSON Lines input (corpora, prompt files);
* :mod:`~orchestrator.contract.strict_json` -- non-finite floats as ``null`` (metrics, summaries).

Nothing is re-exported here, so importing one module never drags in the others (and
:mod:`orchestrator.config` can import the errors without a cycle).
"""

"""workers: the data plane that runs inside Ray Train workers (DeepSpeed engine, parallel wiring,
data, checkpoints). Importing this package does not import torch; its submodules
``orchestrator.contract.layout`` and ``workers.data`` are pure Python/numpy so the controller can use them."""

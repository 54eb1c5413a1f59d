"""Hybrid parallelism for the workers: tensor x pipeline x data parallel with DeepSpeed.

Applied in a fixed order on every rank (torchtitan-style named steps):

1. :func:`workers.parallel.groups.build_groups` -- process groups for the layout and the ``mpu``
   object that tells DeepSpeed about them (rank grid from DeepSpeed's
   ``PipeModelDataParallelTopology``, checked against the pure arithmetic of
   :class:`orchestrator.contract.layout.Layout`);
2. :func:`workers.parallel.pipeline.build_pipeline` -- the model as layer specs (vocab-parallel
   embedding, tensor-parallel blocks from :func:`workers.parallel.tensor_parallel.apply_tensor_parallel`,
   final norm, tied head); a DeepSpeed ``PipelineModule`` when ``pp > 1``, so each stage builds
   only its own layers;
3. :func:`workers.parallel.engine.build_engine` -- ``deepspeed.initialize`` (ZeRO over the
   data-parallel group) behind one adapter for the plain and the pipeline engine;
4. :mod:`workers.parallel.reshard` -- layout-independent (consolidated) checkpoints.
"""

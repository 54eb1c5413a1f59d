"""Model compression for deployment: structured pruning, distillation, ONNX + INT8.

* :mod:`mla.compress.importance`: activation importance of MLP neurons and GQA head groups on
  calibration batches (Minitron, Muralidharan et al. 2024, Sec. 2.2);
* :mod:`mla.compress.prune`: the pruning plan (which units each layer keeps), its checks
  (GQA and tensor-parallel divisibility) and physical removal into an ordinary, smaller
  :class:`mla.MLATransformer`;
* :mod:`mla.compress.distill`: recovery by logit distillation from the unpruned teacher;
* :mod:`mla.compress.onnx_export`: ONNX export, ONNX Runtime dynamic INT8 and an ONNX Runtime
  session that scores like the torch model.

torch is imported by the submodules; ``onnx``/``onnxruntime`` (the ``compress`` extra) only by
:mod:`mla.compress.onnx_export`, inside its functions. No Ray, no DeepSpeed.
"""

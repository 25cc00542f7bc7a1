"""Model architectures used by fire-onnx's demo, tests and benchmarks (installed as ``fire_onnx_models``).

Written here because torchvision does not import beside the CPU torch build we use. Each module
exposes plain ``torch.nn.Module`` classes and a ``build(num_classes, in_channels, ...)`` factory so
they can be passed to ``fire-onnx fit --model fire_onnx_models.small_cnn:build``.
"""

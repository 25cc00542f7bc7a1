"""fire-onnx: deployable feature-space inference-time repair (FIRE) of backdoored models.

Library layout (heavy modules are imported lazily by the functions that need them):

- :mod:`fire_onnx.directions`  directions file schema, load/save/validate (numpy only)
- :mod:`fire_onnx.patch`       insert the repair into an ONNX graph (onnx + onnx-graphsurgeon, no torch)
- :mod:`fire_onnx.inspect`     candidate tensors of an ONNX model
- :mod:`fire_onnx.estimate`    direction/threshold estimation from activations (numpy only)
- :mod:`fire_onnx.fit`         collect activations from a PyTorch model (torch)
- :mod:`fire_onnx.triggers`    BadNets/Blended triggers on uint8 NHWC images (numpy only)
- :mod:`fire_onnx.evaluate`    CA / ASR / RA with onnxruntime
- :mod:`fire_onnx.demo`        the end-to-end demo on bundled MNIST digits
"""

__version__ = "0.1.0"

from fire_onnx.errors import FireError  # noqa: E402

__all__ = ["FireError", "__version__"]

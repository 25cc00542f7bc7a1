"""``python -m fire_onnx`` runs the command line."""

from fire_onnx.cli import main

main()
